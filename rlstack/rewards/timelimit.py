"""Run checks of unbounded cost (sympy, math-verify) under a per-call time limit, from any thread.

`signal.alarm` only works in the main thread and cannot interrupt a long C call (a big-int `9**9**9`),
and Ray runs actor methods in threads. So checks run in a separate worker process: the caller sends one
request at a time over a socket and waits with `select` for at most `time_limit` seconds. On a timeout
the worker is killed with SIGKILL (which always works) and the call answers `Failure.TIMEOUT`.

Restarting would cost a cold start (interpreter + imports: ~1 s for math-verify), so a *zygote* process
does the imports once and forks each worker: a replacement after a timeout is ready in milliseconds,
already warm. The zygote never runs a check and never starts a thread, so forking it is safe. It exits
when its parent closes the control socket (or dies); the kernel kills workers when the zygote exits
(PR_SET_PDEATHSIG), even mid-computation. All of them run under an address-space limit.

Cost per call: one socket round trip (~30-100 us). The zygote's start is paid once per
`TimeLimitedWorker` and never counts against the time limit.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


class Failure(enum.Enum):
    TIMEOUT = "timeout"
    """The call ran past the time limit; its worker was killed (the next call gets a fresh one)."""
    CRASH = "crash"
    """The worker died during the call (segfault, out of memory)."""
    ERROR = "error"
    """The function raised an exception inside the worker (the worker lives on)."""


@dataclass
class WorkerStats:
    calls: int = 0
    timeouts: int = 0
    crashes: int = 0
    errors: int = 0
    zygote_starts: int = 0
    """Cold starts (interpreter + imports)."""
    forks: int = 0
    """Workers forked from the zygote (one at first, one more after each timeout or crash)."""
    last_error: str = ""


class _Channel:
    """A socket carrying newline-terminated messages, read with a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def read_line(self, deadline: float) -> bytes | None:
        """The next line, None at the deadline; EOFError if the other side is gone."""
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if not select.select([self.sock], [], [], remaining)[0]:
                return None
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def close(self) -> None:
        self.sock.close()


@dataclass
class _Processes:
    """What the finalizer must clean up; replaced pieces are updated in place."""

    zygote: subprocess.Popen[bytes] | None = None
    control: _Channel | None = None
    zygote_ready: bool = False
    worker: _Channel | None = None
    worker_pid: int = 0

    def kill_worker(self) -> None:
        if self.worker is not None:
            _kill(self.worker_pid)
            self.worker.close()
            self.worker = None

    def kill_all(self) -> None:
        self.kill_worker()
        if self.control is not None:
            self.control.close()  # the zygote exits on EOF; kill it anyway in case it is stuck
            self.control = None
        if self.zygote is not None:
            self.zygote.kill()
            self.zygote.wait()
            self.zygote = None
        self.zygote_ready = False


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone (the zygote reaps its workers)
        os.kill(pid, signal.SIGKILL)


class TimeLimitedWorker:
    """Calls `fn(*args)` (given as "pkg.mod:fn"; JSON-serialisable args and result) in a worker process,
    each call limited to `time_limit` seconds. Thread-safe: calls from several threads queue up.

    >>> w = TimeLimitedWorker("operator:add", time_limit=5.0)
    >>> w.map([(1, 2), ("a", "b")])
    [3, 'ab']
    >>> w.close()
    """

    def __init__(
        self,
        fn: str,
        *,
        time_limit: float,
        warmup: str | None = None,
        start_timeout: float = 120.0,
        memory_limit_mb: int | None = 4096,
    ) -> None:
        """warmup: "pkg.mod:fn" called once in the zygote after importing `fn` (e.g. a first parse), so
        every forked worker starts warm. start_timeout: seconds allowed for the zygote's imports."""
        if time_limit <= 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
        self.fn, self.warmup, self.time_limit = fn, warmup, time_limit
        self.start_timeout, self.memory_limit_mb = start_timeout, memory_limit_mb
        self.stats = WorkerStats()
        self._lock = threading.Lock()
        self._procs = _Processes()
        self._finalizer = weakref.finalize(self, self._procs.kill_all)

    # -- lifecycle --

    def start(self) -> None:
        """Start the zygote now (otherwise the first call does); does not wait for its imports."""
        with self._lock:
            self._start_zygote()

    def _start_zygote(self) -> None:
        if self._procs.zygote is not None and self._procs.zygote.poll() is None:
            return
        self._procs.kill_all()
        env = dict(os.environ)
        # Whatever this process can import (rlstack from a checkout, test-only packages), the zygote can too.
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in sys.path if p)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        config = {"fn": self.fn, "warmup": self.warmup, "memory_limit_mb": self.memory_limit_mb}
        self._procs.zygote = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from rlstack.rewards.timelimit import serve; serve()",
                json.dumps(config),
                str(theirs.fileno()),
            ],
            stdin=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            env=env,
        )
        theirs.close()
        self._procs.control = _Channel(ours)
        self.stats.zygote_starts += 1

    def _fork_worker(self) -> None:
        """A fresh worker from the zygote (started and waited for as needed)."""
        self._start_zygote()
        procs = self._procs
        assert procs.control is not None
        deadline = time.monotonic() + self.start_timeout
        try:
            if not procs.zygote_ready:
                line = procs.control.read_line(deadline)
                if line is None or json.loads(line).get("ready") is not True:
                    raise EOFError
                procs.zygote_ready = True
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                procs.control.send(b"fork\n", fds=[theirs.fileno()])
            finally:
                theirs.close()
            line = procs.control.read_line(deadline)
            if line is None:
                raise EOFError
        except (EOFError, BrokenPipeError, ConnectionResetError):
            code = procs.zygote.poll() if procs.zygote else None
            procs.kill_all()
            raise RuntimeError(
                f"time-limited worker for {self.fn} did not start within {self.start_timeout:.0f} s "
                f"(exit code {code}); its error, if any, is on stderr above"
            ) from None
        procs.worker, procs.worker_pid = _Channel(ours), json.loads(line)["pid"]
        self.stats.forks += 1

    def close(self) -> None:
        with self._lock:
            self._procs.kill_all()

    def __enter__(self) -> TimeLimitedWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The current worker's process id (None before the first call and after a timeout)."""
        return self._procs.worker_pid if self._procs.worker is not None else None

    # -- calls --

    def map(self, items: Sequence[Sequence[Any]]) -> list[Any]:
        """`fn(*args)` for each args tuple, in order; a call that failed answers a `Failure`."""
        with self._lock:
            return [self._call(list(args)) for args in items]

    def _call(self, args: list[Any]) -> Any:
        if self._procs.worker is None:
            try:
                self._fork_worker()
            except RuntimeError:
                if not self.stats.forks:  # it never started: a real problem (import error, ...)
                    raise
                self._fork_worker()  # a zygote that worked before died (e.g. OOM killer): one fresh start
        worker = self._procs.worker
        assert worker is not None
        self.stats.calls += 1
        start = time.monotonic()
        try:
            worker.send(json.dumps(args).encode() + b"\n")
            line = worker.read_line(start + self.time_limit)
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self._procs.kill_worker()
            self.stats.crashes += 1
            return Failure.CRASH
        if line is None:
            self._procs.kill_worker()
            self.stats.timeouts += 1
            return Failure.TIMEOUT
        reply = json.loads(line)
        if "error" in reply:
            self.stats.errors += 1
            self.stats.last_error = reply["error"]
            return Failure.ERROR
        return reply["value"]


# ---- the zygote and its workers ----------------------------------------------------------------------


def _import(path: str) -> Callable[..., Any]:
    import importlib

    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def serve() -> None:
    """Zygote main loop: import, warm up, then fork one worker per `fork` message (with its socket)."""
    config, control = json.loads(sys.argv[1]), socket.socket(fileno=int(sys.argv[2]))
    if config["memory_limit_mb"]:
        import resource

        limit = config["memory_limit_mb"] << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    fn = _import(config["fn"])
    if config["warmup"]:
        _import(config["warmup"])()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed workers are reaped automatically
    control.sendall(b'{"ready": true}\n')
    while True:
        msg, fds, _, _ = socket.recv_fds(control, 64, 1)
        if not msg or not fds:  # the parent closed the control socket or is gone
            os._exit(0)
        pid = os.fork()
        if pid == 0:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _serve_worker(socket.socket(fileno=fds[0]), fn)
            os._exit(0)
        os.close(fds[0])
        control.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _exit_with_zygote() -> None:
    """The zygote exits with our caller; a worker must follow even when busy in a C call that holds the
    GIL (a big-int power), so the kernel kills it: PR_SET_PDEATHSIG fires when the parent *thread* exits,
    and the zygote has only one. Elsewhere than Linux, a watcher thread does its best."""
    zygote = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):

        def watch() -> None:
            while os.getppid() == zygote:
                time.sleep(0.5)
            os._exit(0)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != zygote:  # the zygote died before the kernel was told
        os._exit(0)


def _serve_worker(conn: socket.socket, fn: Callable[..., Any]) -> None:
    """One JSON args list per line in -> one {"value"} or {"error"} line out, until the socket closes."""
    _exit_with_zygote()
    for line in conn.makefile("rb"):
        try:
            reply = {"value": fn(*json.loads(line))}
        except Exception as e:  # reported to the caller, which counts it; the worker lives on
            reply = {"error": f"{type(e).__name__}: {e}"[:500]}
        conn.sendall(json.dumps(reply).encode() + b"\n")
