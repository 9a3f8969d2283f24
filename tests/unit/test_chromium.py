"""The headless Chromium driver against a real Chromium (no mocks): pages served over HTTP from a temp dir.

Without Chromium these tests fail with the install hint (scripts/install_chromium.sh), they do not skip."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from rlstack.monitor.chromium import Chromium, ChromiumError, Page, find_chromium

PAGE = """<!doctype html><html><head><title>t</title><link rel="icon" href="data:,"></head>
<body style="margin:0">
<div style="height: 2500px">tall</div>
<img src="missing.png">
<script>
  console.log("just saying");
  console.error("something broke", 42);
  localStorage.loads = String(Number(localStorage.loads || 0) + 1);
  setTimeout(() => { window.ready = "yes"; }, 300);
  setTimeout(() => { throw new Error("kaboom"); }, 50);
</script></body></html>"""


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of an HTTP server on 127.0.0.1 serving PAGE as /index.html (and 404 for missing.png)."""
    root = tmp_path_factory.mktemp("site")
    (root / "index.html").write_text(PAGE)
    (root / "blank.html").write_text("<!doctype html><p>blank</p>")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    with Chromium(timeout=30) as b:
        yield b


@pytest.fixture
def page(browser: Chromium, site: str) -> Iterator[Page]:
    p = browser.open(f"{site}/index.html", timeout=30)
    yield p
    p.close()


def _live_pids(pgid: int, marker: str) -> list[int]:
    """Non-zombie processes in process group `pgid` or with `marker` in their command line."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            state, _ppid, group = stat[stat.rindex(")") + 2 :].split()[:3]
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if state not in ("Z", "X") and (int(group) == pgid or marker in cmdline):
            found.append(int(proc.name))
    return found


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_find_chromium_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ChromiumError, match=r"scripts/install_chromium\.sh"):
        find_chromium()
    with pytest.raises(ChromiumError, match=r"apt-get install chromium"):
        Chromium()


def test_eval(page: Page) -> None:
    assert page.eval("1 + 2") == 3
    assert page.eval("({a: [1, 'x', null], b: true})") == {"a": [1, "x", None], "b": True}
    assert page.eval("new Promise(r => setTimeout(() => r('later'), 50))") == "later"
    assert page.eval("undefined") is None
    assert page.eval("[innerWidth, innerHeight, devicePixelRatio]") == [1400, 1000, 1]
    with pytest.raises(ChromiumError, match="TypeError: nope"):
        page.eval("throw new TypeError('nope')")
    with pytest.raises(ChromiumError, match="rejected"):
        page.eval("Promise.reject(new Error('rejected'))")


def test_wait_for(page: Page) -> None:
    start = time.monotonic()
    assert page.wait_for("window.ready", timeout=10) == "yes"
    assert time.monotonic() - start < 5
    # a throwing expression counts as "not yet"; the timeout names the last value and the console errors
    with pytest.raises(ChromiumError, match=r"(?s)waiting for 'window\.nothing.*TypeError.*something broke"):
        page.wait_for("window.nothing.here", timeout=0.6, interval=0.1)


def test_console_errors(page: Page) -> None:
    page.wait_for("window.ready", timeout=10)  # the uncaught exception (setTimeout 50 ms) has happened
    errors = "\n".join(page.console_errors)
    assert "console.error: something broke 42" in errors
    assert "/index.html:" in errors  # source location
    assert "Uncaught Error: kaboom" in errors
    assert "404" in errors and "missing.png" in errors
    assert "just saying" not in errors
    assert any("just saying" in m for m in page.console_messages)
    assert len(page.console_errors) == 3, page.console_errors


def test_reload(page: Page) -> None:
    first = int(page.eval("localStorage.loads"))
    page.reload(timeout=30)
    assert int(page.eval("localStorage.loads")) == first + 1
    assert page.eval("document.readyState") == "complete"


def test_navigate(page: Page, site: str) -> None:
    page.navigate(f"{site}/blank.html", timeout=30)
    assert page.eval("document.body.textContent") == "blank"
    page.navigate(f"{site}/blank.html#part", timeout=30)  # same document: no load event to wait for
    assert page.eval("location.hash") == "#part"


def test_screenshot(page: Page, tmp_path: Path) -> None:
    full = page.screenshot(tmp_path / "deep" / "dir" / "full.png")
    assert full == tmp_path / "deep" / "dir" / "full.png"
    width, height = _png_size(full)
    assert width == 1400 and height >= 2500
    assert _png_size(page.screenshot(tmp_path / "viewport.png", full_page=False)) == (1400, 1000)


def test_close_leaves_nothing_behind(site: str) -> None:
    start = time.monotonic()
    b = Chromium(width=800, height=600, timeout=30)
    page = b.open(f"{site}/blank.html", timeout=30)
    assert page.eval("innerWidth") == 800
    root = b.profile_dir.parent
    assert _live_pids(b.pid, str(root))  # the marker finds the browser while it runs
    b.open(f"{site}/blank.html", timeout=30)
    b.close()
    assert _live_pids(b.pid, str(root)) == []
    assert not b.profile_dir.exists() and not root.exists()
    b.close()  # idempotent
    with pytest.raises(ChromiumError):
        page.eval("1")
    assert time.monotonic() - start < 20


def test_hung_page_crashed_page_and_dead_browser_fail_fast(site: str) -> None:
    with Chromium(timeout=30) as b:
        page = b.open(f"{site}/blank.html", timeout=30)
        start = time.monotonic()
        with pytest.raises(ChromiumError, match="no reply within 1 s"):
            page.eval("while (true) {}", timeout=1)
        assert time.monotonic() - start < 5
        crashing = b.open(f"{site}/blank.html", timeout=30)
        with pytest.raises(ChromiumError):
            crashing.navigate("chrome://crash", timeout=10)
        with pytest.raises(ChromiumError, match="crashed"):
            crashing.eval("1", timeout=10)
        assert time.monotonic() - start < 10
        other = b.open(f"{site}/blank.html", timeout=30)
        os.killpg(b.pid, signal.SIGKILL)  # the browser dies under us: calls fail fast, close still cleans up
        with pytest.raises(ChromiumError, match=r"closed|exited"):
            other.eval("1", timeout=10)
        root = b.profile_dir.parent
    assert _live_pids(b.pid, str(root)) == []
    assert not root.exists()
