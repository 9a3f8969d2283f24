"""The live dashboard: the report page served on 127.0.0.1, polling `/data.json` while the runs go.

`/` is the page (built with the payload of the moment and the live flag); `/data.json` is the payload,
rebuilt when a run directory's files changed (sizes and mtimes), with an ETag so that an unchanged poll
costs a 304. Stdlib only: `http.server.ThreadingHTTPServer`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rlstack.monitor.report.data import MAX_ROLLOUTS, MAX_TOKENS, PayloadBuilder, ReportError, to_json
from rlstack.monitor.report.page import render_page

log = logging.getLogger(__name__)


class LivePayload:
    """The current payload of the run directories, rebuilt only when their files changed. A rebuild that
    fails (e.g. a file with a bad line) keeps the last good payload, with the error among its warnings."""

    def __init__(self, builder: PayloadBuilder) -> None:
        self.builder = builder
        self._lock = threading.Lock()
        self._payload = builder.build()  # a first failure is the caller's error (ReportError)
        self._json = to_json(self._payload)

    def get(self) -> tuple[dict[str, Any], str]:
        """(payload, its JSON), fresh."""
        with self._lock:
            if self.builder.signature() != self._payload["signature"]:
                try:
                    self._payload = self.builder.build()
                except ReportError as e:
                    signature = self.builder.signature()
                    self._payload = dict(self._payload, signature=signature, error=str(e))
                self._json = to_json(self._payload)
            return self._payload, self._json


class DashboardServer:
    """The dashboard's HTTP server. `start` serves in a thread; the CLI then `wait`s for Ctrl-C."""

    def __init__(
        self,
        run_dirs: Sequence[str | Path],
        host: str = "127.0.0.1",
        port: int = 0,
        refresh_s: float = 5.0,
        max_tokens: int = MAX_TOKENS,
        max_rollouts: int = MAX_ROLLOUTS,
    ) -> None:
        if refresh_s <= 0:
            raise ReportError(f"refresh_s must be above 0, got {refresh_s}")
        self.live = LivePayload(PayloadBuilder(run_dirs, max_tokens, max_rollouts))
        self.refresh_s = refresh_s
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        host = str(host)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def page(self) -> str:
        payload, _ = self.live.get()
        return render_page(payload, live={"refresh_s": self.refresh_s, "data_url": "data.json"})

    def start(self) -> DashboardServer:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.2,), name="rlstack-dashboard", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and free the port."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()

    def wait(self) -> None:
        """Block until Ctrl-C (SIGINT), then close cleanly. SIGINT raises KeyboardInterrupt here even when
        the process started with it ignored (launched from a background shell job, which Python honours)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while self._thread is not None and self._thread.is_alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    run_dirs: Sequence[str | Path],
    host: str = "127.0.0.1",
    port: int = 0,
    refresh_s: float = 5.0,
    max_tokens: int = MAX_TOKENS,
    max_rollouts: int = MAX_ROLLOUTS,
) -> DashboardServer:
    """A dashboard serving in a background thread (port 0: a free port); `.url`, `.close()`."""
    return DashboardServer(run_dirs, host, port, refresh_s, max_tokens, max_rollouts).start()


def _handler(server: DashboardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path in ("/", "/index.html"):
                    self._send(server.page().encode(), "text/html; charset=utf-8")
                elif path == "/data.json":
                    payload, text = server.live.get()
                    etag = f'"{payload["signature"]}"'
                    if self.headers.get("If-None-Match") == etag:
                        self._send(b"", None, HTTPStatus.NOT_MODIFIED, etag)
                    else:
                        self._send(text.encode(), "application/json", etag=etag)
                else:
                    self._send(b"not found\n", "text/plain", HTTPStatus.NOT_FOUND)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the browser went away
            except Exception as e:  # keep serving; the page shows the error
                log.exception("dashboard: %s failed", path)
                self._send(
                    f"{type(e).__name__}: {e}\n".encode(), "text/plain", HTTPStatus.INTERNAL_SERVER_ERROR
                )

        def _send(
            self,
            body: bytes,
            content_type: str | None,
            status: HTTPStatus = HTTPStatus.OK,
            etag: str | None = None,
        ) -> None:
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-cache")
            if etag:
                self.send_header("ETag", etag)
            self.end_headers()
            if body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("dashboard: " + format, *args)

    return Handler
