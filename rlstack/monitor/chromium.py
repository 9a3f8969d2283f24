"""A small driver for headless Chromium over the DevTools protocol (CDP): open a page, evaluate JavaScript,
wait for a condition, collect console errors, take screenshots.

One websocket per page target, read by the calling thread (no background threads of ours): events that
arrive while a command waits for its reply are dispatched to the page's lists. Not thread-safe.

Nothing outlives `Chromium.close()`: the browser runs in its own process group (killed as a whole), every
file it writes (profile, temp files, crashpad database) lies in one temp dir that is removed, and it does
not use /dev/shm. Every wait has a timeout, so a hung browser fails a test instead of hanging it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.sync.client import ClientConnection, connect

INSTALL_HINT = "install it: scripts/install_chromium.sh (apt-get install chromium)"
_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Debian's /usr/bin/chromium is a shell wrapper that sources /etc/chromium.d (which adds extension flags
# and, with more than one tmpfs on /dev/shm, prints a shell error), then execs this binary: we run that.
_DEBIAN_BINARY = Path("/usr/lib/chromium/chromium")
_Params = dict[str, Any] | None
# stderr lines left out of error messages: no system bus and no cpufreq in /sys (crashpad) in containers
_STDERR_NOISE = ("dbus", "cpufreq", "DevTools listening")
_GRACE_S = 5.0  # how long a browser may take to exit after Browser.close before it is killed


class ChromiumError(RuntimeError):
    """Chromium is missing, failed to start, crashed, timed out, or a command or JS evaluation failed."""


class JavaScriptError(ChromiumError):
    """An evaluated expression threw (or its promise rejected); the message carries the JS error."""


class _CommandError(ChromiumError):
    """The browser answered a CDP command with an error."""


def find_chromium() -> str:
    """Path of a Chromium (or Chrome) executable on PATH; ChromiumError with the install hint if none."""
    for name in _NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise ChromiumError(f"no Chromium on PATH (looked for {', '.join(_NAMES)}); {INSTALL_HINT}")


def _executable(path: str) -> str:
    """The binary to run for `path`: Debian's real binary instead of its shell wrapper."""
    try:
        with open(path, "rb") as f:
            is_script = f.read(2) == b"#!"
    except OSError:
        return path
    return str(_DEBIAN_BINARY) if is_script and os.access(_DEBIAN_BINARY, os.X_OK) else path


class _Connection:
    """A CDP websocket: commands by id, events passed to `on_event` as they are read."""

    def __init__(
        self,
        url: str,
        timeout: float,
        on_event: Callable[[str, dict[str, Any]], None] | None,
        diagnose: Callable[[], str],
    ) -> None:
        self._on_event = on_event
        self._diagnose = diagnose
        self._next_id = 0
        self.failure = ""  # set (by an event handler) when no reply will ever come: the target crashed
        try:
            self._ws: ClientConnection = connect(
                url,
                legacy=True,  # a plain connection we close ourselves
                proxy=None,  # never through an HTTP(S)_PROXY from the environment
                compression=None,
                open_timeout=timeout,
                close_timeout=2,
                ping_interval=None,
                max_size=None,  # full-page screenshots come as one large message
            )
        except (OSError, TimeoutError, WebSocketException) as e:
            raise ChromiumError(f"cannot connect to {url}: {e!r}{diagnose()}") from e

    def call(self, method: str, params: _Params = None, timeout: float = 30.0) -> dict[str, Any]:
        """Send a command and return its result, dispatching the events read meanwhile."""
        self._next_id += 1
        msg_id = self._next_id
        try:
            self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        except ConnectionClosed as e:
            raise ChromiumError(f"{method}: DevTools connection closed ({e}){self._diagnose()}") from e
        deadline = time.monotonic() + timeout
        while True:
            msg = self.read(deadline - time.monotonic())
            if self.failure:
                raise ChromiumError(f"{method}: {self.failure}{self._diagnose()}")
            if msg is None:
                raise ChromiumError(f"{method}: no reply within {timeout:g} s{self._diagnose()}")
            if msg.get("id") == msg_id:  # replies to earlier, timed-out commands are dropped
                if "error" in msg:
                    err = msg["error"]
                    detail = f" ({err['data']})" if err.get("data") else ""
                    raise _CommandError(f"{method}: {err.get('message', err)}{detail}")
                result: dict[str, Any] = msg.get("result", {})
                return result

    def read(self, timeout: float) -> dict[str, Any] | None:
        """Read one message (an event is dispatched first); None if none came within `timeout`."""
        try:
            raw = self._ws.recv(timeout=max(timeout, 0.0))
        except TimeoutError:
            return None
        except ConnectionClosed as e:
            raise ChromiumError(f"DevTools connection closed ({e}){self._diagnose()}") from e
        msg: dict[str, Any] = json.loads(raw)
        if "method" in msg and "id" not in msg and self._on_event is not None:
            self._on_event(msg["method"], msg.get("params", {}))
        return msg

    def pump(self, seconds: float, until: Callable[[], bool] = lambda: False) -> bool:
        """Dispatch events for up to `seconds` (0: only those already received); True once `until()` holds."""
        deadline = time.monotonic() + seconds
        while not until():
            if self.read(deadline - time.monotonic()) is None:
                return until()
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ws.close()


def _remote_text(obj: dict[str, Any]) -> str:
    """A Runtime.RemoteObject as console text."""
    if "value" in obj:
        value = obj["value"]
        return value if isinstance(value, str) else json.dumps(value)
    for key in ("unserializableValue", "description"):
        if key in obj:
            return str(obj[key])
    return str(obj.get("type", "?"))


def _remote_value(obj: dict[str, Any]) -> Any:
    """A Runtime.RemoteObject returned by value as Python (undefined: None; NaN, ±Infinity, -0: float)."""
    if "value" in obj:
        return obj["value"]
    special = obj.get("unserializableValue")
    if special is None:
        return None
    return int(special[:-1]) if special.endswith("n") else float(special)


def _js_truthy(value: Any) -> bool:
    """JavaScript's truthiness of a value returned by value (false, 0, NaN, "", null/undefined are falsy)."""
    if value is None or value is False or value == "":
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value == value and value != 0  # NaN != NaN
    return True


def _location(url: str | None, line: int | None = None, column: int | None = None) -> str:
    """' (url:line:col)' from 0-based line/column, or '' when unknown."""
    if not url:
        return ""
    where = url if line is None else f"{url}:{line + 1}" + ("" if column is None else f":{column + 1}")
    return f" ({where})"


def _frame_location(stack: dict[str, Any] | None) -> str:
    frames = (stack or {}).get("callFrames") or []
    if not frames:
        return ""
    top = frames[0]
    return _location(top.get("url"), top.get("lineNumber"), top.get("columnNumber"))


def _exception_text(details: dict[str, Any]) -> str:
    """Readable text of a Runtime.ExceptionDetails: 'Uncaught Error: boom', without the stack."""
    exc = details.get("exception") or {}
    described = exc.get("description") or (_remote_text(exc) if exc else "")
    first = str(described).split("\n", 1)[0]
    text = str(details.get("text", ""))
    return text if not first or first in text else f"{text} {first}".strip()


class Page:
    """One browser tab. `console_errors` / `console_messages` fill as events are read (during any call)."""

    def __init__(self, browser: Chromium, target_id: str, ws_url: str, timeout: float) -> None:
        self.console_errors: list[str] = []
        self.console_messages: list[str] = []
        self.target_id = target_id
        self._browser = browser
        self._lifecycle: list[tuple[str, str]] = []  # (loaderId, event name) of the main frame
        self._closed = False
        self._conn = _Connection(ws_url, timeout, self._on_event, browser._diagnose)
        try:
            for method in ("Inspector.enable", "Runtime.enable", "Log.enable", "Page.enable"):
                self._conn.call(method, timeout=timeout)
            tree = self._conn.call("Page.getFrameTree", timeout=timeout)
            self._frame_id: str = tree["frameTree"]["frame"]["id"]
            self._conn.call("Page.setLifecycleEventsEnabled", {"enabled": True}, timeout=timeout)
            # headless=new keeps room for (invisible) browser UI: the viewport of --window-size=1400,1000
            # would be 1400x913. Make it exactly the requested size, at 1 device pixel per CSS pixel.
            size = {"width": browser.width, "height": browser.height}
            metrics = {**size, "deviceScaleFactor": 1, "mobile": False}
            self._conn.call("Emulation.setDeviceMetricsOverride", metrics, timeout=timeout)
        except BaseException:
            self._conn.close()
            raise

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            kind = params.get("type", "log")
            text = " ".join(_remote_text(arg) for arg in params.get("args", []))
            line = f"console.{kind}: {text}{_frame_location(params.get('stackTrace'))}"
            self.console_messages.append(line)
            if kind in ("error", "assert"):
                self.console_errors.append(line)
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            where = _frame_location(details.get("stackTrace")) or _location(
                details.get("url"), details.get("lineNumber"), details.get("columnNumber")
            )
            line = f"{_exception_text(details)}{where}"
            self.console_messages.append(line)
            self.console_errors.append(line)
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            level = entry.get("level", "info")
            line = f"{entry.get('source', 'other')} {level}: {entry.get('text', '')}"
            line += _location(entry.get("url"), entry.get("lineNumber"))
            self.console_messages.append(line)
            if level == "error":
                self.console_errors.append(line)
        elif method == "Page.lifecycleEvent":
            if params.get("frameId") == self._frame_id:
                self._lifecycle.append((params.get("loaderId", ""), params.get("name", "")))
        elif method == "Inspector.targetCrashed":
            self._conn.failure = "the page's renderer crashed"
        elif method == "Inspector.detached":
            self._conn.failure = f"the page was detached ({params.get('reason', '?')})"

    def _call(self, method: str, params: _Params = None, timeout: float = 30.0) -> dict[str, Any]:
        if self._closed:
            raise ChromiumError(f"{method}: the page is closed")
        if self._conn.failure:
            raise ChromiumError(f"{method}: {self._conn.failure}")
        return self._conn.call(method, params, timeout)

    def _wait_load(self, is_ours: Callable[[str], bool], what: str, deadline: float) -> None:
        """Dispatch events until the main frame fires 'load' for a loader `is_ours` accepts."""

        def loaded() -> bool:
            return any(name == "load" and is_ours(loader) for loader, name in self._lifecycle)

        if not self._conn.pump(deadline - time.monotonic(), loaded):
            errors = "; ".join(self.console_errors) or "none"
            diagnosis = self._browser._diagnose()
            raise ChromiumError(f"{what}: no load event in time{diagnosis}; console errors: {errors}")

    def navigate(self, url: str, timeout: float = 60.0) -> None:
        """Go to `url` and wait for its load event (a same-document navigation returns at once)."""
        deadline = time.monotonic() + timeout
        self._lifecycle.clear()
        result = self._call("Page.navigate", {"url": url}, timeout)
        if result.get("errorText"):
            raise ChromiumError(f"navigating to {url}: {result['errorText']}")
        loader = result.get("loaderId")
        if loader:
            self._wait_load(lambda seen: seen == loader, f"navigating to {url}", deadline)
        self._conn.pump(0)

    def reload(self, timeout: float = 60.0) -> None:
        """Reload the page and wait for its load event."""
        deadline = time.monotonic() + timeout
        old = {loader for loader, _ in self._lifecycle}
        self._lifecycle.clear()
        self._call("Page.reload", {}, timeout)
        self._wait_load(lambda seen: seen not in old, "reload", deadline)
        self._conn.pump(0)

    def eval(self, expression: str, timeout: float = 30.0) -> Any:
        """Evaluate `expression` (awaiting a promise) and return its value as JSON-like Python.

        A JS exception or rejected promise raises JavaScriptError with the JS message."""
        result = self._call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True, "userGesture": True},
            timeout,
        )
        self._conn.pump(0)
        if "exceptionDetails" in result:
            error = _exception_text(result["exceptionDetails"])
            raise JavaScriptError(f"{error} (evaluating {expression!r})")
        return _remote_value(result.get("result", {}))

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.2) -> Any:
        """Evaluate `expression` every `interval` s until it is truthy (as in JS: [] and {} are, an element
        found is {}) and return that value.

        JS exceptions (and a page between documents) count as not yet; on timeout, ChromiumError with the
        last value and the console errors."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                value = self.eval(expression, timeout=max(deadline - time.monotonic(), 2.0))
                if _js_truthy(value):
                    return value
                last = value
            except (JavaScriptError, _CommandError) as e:
                last = f"<{e}>"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                errors = "; ".join(self.console_errors) or "none"
                raise ChromiumError(
                    f"timed out after {timeout:g} s waiting for {expression!r}; last value: {last!r}; "
                    f"console errors: {errors}"
                )
            self._conn.pump(min(interval, remaining))

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        """Save a PNG of the page (whole document, or only the viewport) at `path`; returns the path."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self._call("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            clip = {"x": 0, "y": 0, "width": math.ceil(size["width"]), "height": math.ceil(size["height"])}
            params.update(captureBeyondViewport=True, clip={**clip, "scale": 1})
        data = self._call("Page.captureScreenshot", params, timeout=60.0)["data"]
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        """Close this tab (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._conn.close()
        self._browser._close_target(self.target_id)


def _session_pids(pgid: int, marker: str) -> list[int]:
    """Live (non-zombie) processes in process group `pgid` or whose command line mentions `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] in "ZX":
                continue
            if int(fields[2]) == pgid or marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def _shutdown(proc: subprocess.Popen[bytes], root: Path, state: dict[str, float]) -> None:
    """Wait `state['grace']` s for the browser to exit, then kill its whole process tree; remove its temp dir.

    Also runs when the Chromium object is garbage-collected or at interpreter exit (grace 0 then)."""
    try:
        proc.wait(timeout=state["grace"])
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10.0)
    # Children left behind by the main process; crashpad handlers run in their own sessions, found by the
    # temp dir in their command line (their database lies there).
    deadline = time.monotonic() + 5.0
    while (pids := _session_pids(proc.pid, str(root))) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    for _ in range(20):  # a dying process may still be writing into the profile
        try:
            shutil.rmtree(root)
            break
        except FileNotFoundError:
            break
        except OSError:
            time.sleep(0.1)
    shutil.rmtree(root, ignore_errors=True)


class Chromium:
    """A headless Chromium with a fresh profile, started at construction; a context manager.

    `pid` is the browser's pid (and process group id); `profile_dir` its user data dir."""

    def __init__(self, width: int = 1400, height: int = 1000, timeout: float = 60.0) -> None:
        self.width, self.height, self.timeout = width, height, timeout
        self._pages: list[Page] = []
        self._browser: _Connection | None = None
        self._closed = False
        executable = _executable(find_chromium())
        self._root = Path(tempfile.mkdtemp(prefix="rlstack-chromium-"))
        self.profile_dir = self._root / "profile"
        env = dict(os.environ)
        for var, sub in (("TMPDIR", "tmp"), ("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache")):
            (self._root / sub).mkdir()
            env[var] = str(self._root / sub)  # crashpad's database and temp files: inside the temp dir
        args = [
            executable,
            "--headless=new",
            "--remote-debugging-port=0",
            f"--user-data-dir={self.profile_dir}",
            *(["--no-sandbox"] if os.geteuid() == 0 else []),
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            f"--window-size={width},{height}",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--mute-audio",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-breakpad",
            "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows",
            "--password-store=basic",
            "about:blank",
        ]
        self._stderr_path = self._root / "stderr.log"
        with open(self._stderr_path, "wb") as stderr:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
                start_new_session=True,
            )
        self.pid = self._proc.pid
        self._shutdown_state = {"grace": 0.0}
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self._root, self._shutdown_state)
        try:
            self._port, path = self._devtools_endpoint(time.monotonic() + timeout)
            self._browser = _Connection(f"ws://127.0.0.1:{self._port}{path}", timeout, None, self._diagnose)
        except BaseException:
            self.close()
            raise

    def _devtools_endpoint(self, deadline: float) -> tuple[int, str]:
        """(port, browser websocket path) from DevToolsActivePort in the profile, else from stderr."""
        active = self.profile_dir / "DevToolsActivePort"
        while True:
            with contextlib.suppress(OSError, ValueError):
                lines = active.read_text().split("\n")
                if len(lines) >= 2 and lines[1].startswith("/devtools/"):
                    return int(lines[0]), lines[1].strip()
            with contextlib.suppress(OSError):
                stderr = self._stderr_path.read_text(errors="replace")
                found = re.search(r"DevTools listening on ws://[^:/]+:(\d+)(/\S+)", stderr)
                if found:
                    return int(found[1]), found[2]
            if self._proc.poll() is not None:
                raise ChromiumError(f"Chromium exited with code {self._proc.returncode}{self._diagnose()}")
            if time.monotonic() > deadline:
                raise ChromiumError(f"Chromium did not open its DevTools port in time{self._diagnose()}")
            time.sleep(0.02)

    def _diagnose(self) -> str:
        """A suffix for error messages: whether the browser still runs, and the end of its stderr."""
        parts = []
        if self._proc.poll() is not None:
            parts.append(f"browser exited with code {self._proc.returncode}")
        with contextlib.suppress(OSError):
            lines = [
                line
                for line in self._stderr_path.read_text(errors="replace").splitlines()
                if line.strip() and not any(word in line for word in _STDERR_NOISE)
            ]
            if lines:
                parts.append("stderr: " + " | ".join(lines[-8:]))
        return "; " + "; ".join(parts) if parts else ""

    def __enter__(self) -> Chromium:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self, url: str, timeout: float = 60.0) -> Page:
        """Open `url` in a new tab (Runtime, Log and Page events on) and wait for its load event."""
        if self._closed or self._browser is None:
            raise ChromiumError("the browser is closed")
        target_id = self._browser.call("Target.createTarget", {"url": "about:blank"}, timeout)["targetId"]
        try:
            page = Page(self, target_id, f"ws://127.0.0.1:{self._port}/devtools/page/{target_id}", timeout)
        except BaseException:
            self._close_target(target_id)
            raise
        self._pages.append(page)
        try:
            page.navigate(url, timeout)
        except BaseException:
            page.close()
            raise
        return page

    def _close_target(self, target_id: str) -> bool:
        """Close a tab; False if the browser did not answer."""
        if self._browser is None or self._closed:
            return False
        try:
            self._browser.call("Target.closeTarget", {"targetId": target_id}, timeout=5.0)
        except _CommandError:
            pass  # already gone
        except ChromiumError:
            return False
        return True

    def close(self) -> None:
        """Close the tabs, stop the browser (killed after a grace period), remove its profile; idempotent."""
        if self._closed:
            return
        try:
            responsive = self._browser is not None and self._proc.poll() is None
            for page in self._pages:
                if not page._closed:
                    page._closed = True
                    page._conn.close()
                    responsive = responsive and self._close_target(page.target_id)
            if responsive and self._browser is not None:
                try:
                    self._browser.call("Browser.close", timeout=5.0)
                except ChromiumError:
                    responsive = False
            self._shutdown_state["grace"] = _GRACE_S if responsive else 0.0  # a hung browser: kill it now
            if self._browser is not None:
                self._browser.close()
        finally:
            self._closed = True
            self._finalizer()
