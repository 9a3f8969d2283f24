"""The hostile suite (issue 15): programs that try to get out of a sandbox, what the host prepares for each
(a secret file, a listener, a network namespace, a canary process) and how it checks, from the host side
after the run, that nothing got out. Shared by tests/unit/envs/test_hostile.py and scripts/hostile_table.py.

Every program runs as `python3 main.py TOKEN`, TOKEN random per run: every process it starts carries TOKEN in
its command line (fork copies it), so the host counts them while the run lasts and finds any that outlive
it, and every file it writes outside its work dir is named `...written-TOKEN`, so the host finds those too.
A program sees `P` (a dict: TOKEN and what `prepare` set up) and prints "started" first.

The checks run on the host only: what a listener recorded, which processes and files exist after the run,
whether the secret shows up in what the program printed, what the program itself reports having got (memory
held, threads started, bytes written: a program can only understate that, which does not help it).
Programs are bounded (a fork bomb forks at most 256 processes, a memory bomb takes at most 1 GiB, a disk
filler writes at most 4x its cap) so that a backend that fails a case does not take the host with it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rlstack.envs.backends import backend_class, get_sandbox
from rlstack.envs.sandbox import Files, Limits, RunResult, RunStatus, Sandbox, SandboxError

BACKENDS = ("process", "docker", "bubblewrap")
WALL_GRACE_SECONDS = 5.0
"""A run must be over this long after its wall-clock limit (the backend's kill grace and clean-up)."""
PROCESS_SLACK = 4
"""Processes carrying TOKEN that are the backend's own (the process backend's launcher and its namespace
init, a docker client, bwrap) and not the program's: allowed above `Limits.max_processes`."""
SECRET_ENV = "RLSTACK_HOSTILE_API_KEY"
OUTPUT_MARKER_ROOM = 200
"""Bytes a backend may add to a cut stream (its "[... output truncated ...]" marker)."""
HOST_DIRS = ("/", "/tmp", "/var/tmp", "/dev/shm", "/etc", "/root", "/usr/local/bin", "/run", "/home")
"""Where the host looks, after every run, for files a program wrote outside its work dir."""

BASE_LIMITS = Limits(
    wall_seconds=5.0,
    memory_mb=128,
    max_processes=32,
    open_files=64,
    file_size_mb=16,
    disk_mb=16,
    tmp_mb=16,
    max_output_bytes=64 * 1024,
)
SHORT = replace(BASE_LIMITS, wall_seconds=1.0)
"""For the programs that never end by themselves."""


class SetupError(RuntimeError):
    """The host could not prepare a case (then it cannot be judged: the test fails, it is not skipped)."""


@dataclass
class Context:
    """One run of one case: what `prepare` set up, for the program (`params`, seen as P) and the check."""

    token: str
    secret: str
    limits: Limits
    backend: str
    stack: ExitStack
    params: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """What the checks measured (e.g. "held 96 of 128 MiB"), for the table cell."""


Check = Callable[[RunResult, Context], list[str]]


@dataclass(frozen=True)
class HostileCase:
    name: str
    what: str
    """The row label in the table."""
    program: str
    limits: Limits = BASE_LIMITS
    prepare: Callable[[Context], None] | None = None
    check: Check | None = None
    """The escapes this case looks for (host side, after the run); common checks run for every case."""
    check_sandbox_after: bool = False
    """Run a trivial command afterwards: the sandbox must still work (the program did not break it)."""
    may_crash: bool = False
    """A Python traceback is an expected way for it to end (e.g. MemoryError outside the allocation loop)."""


@dataclass
class Outcome:
    case: HostileCase
    backend: str
    result: RunResult | None = None
    case_escapes: list[str] = field(default_factory=list)
    """What the case's own check found."""
    common_escapes: list[str] = field(default_factory=list)
    """What the checks run after every case found: processes left, wall clock overrun, too many processes at
    once, files outside the work dir, output over the cap, host or sandbox no longer working."""
    problems: list[str] = field(default_factory=list)
    """The case could not be judged: set-up failed, the sandbox reported an error, the program did not run."""
    notes: list[str] = field(default_factory=list)
    """What the checks measured, e.g. "held 96 of 128 MiB"."""
    seconds: float = 0.0

    @property
    def escapes(self) -> list[str]:
        return self.case_escapes + self.common_escapes

    def how(self) -> str:
        result = self.result
        if result is None:
            return "no result"
        how: str = result.status
        if result.status == "ok":
            how = f"ok, exit {result.exit_code}"
        elif result.status == "killed":
            how = f"killed, {result.detail}"
        return "; ".join([how, *self.notes])

    def cell(self, gap: str | None) -> str:
        """The table cell: contained (how it ended), NOT contained by design, ESCAPE, or ERROR."""
        if self.problems:
            return "ERROR: " + "; ".join(self.problems)
        if self.escapes and gap and not self.common_escapes:
            return f"NOT contained by design: {gap}"
        if self.escapes:
            return "ESCAPE: " + "; ".join(self.escapes)
        if gap:
            return f"contained ({self.how()}), though listed as a known gap: {gap}"
        return f"contained ({self.how()})"

    def report(self) -> str:
        """Everything about the run, for an assertion message."""
        lines = [f"{self.backend} / {self.case.name} ({self.case.what}) in {self.seconds:.1f} s"]
        if self.result is not None:
            r = self.result
            lines.append(f"result: {r.describe()} (status {r.status}, {r.wall_seconds:.1f} s)")
            lines.append(f"stdout (tail): {r.stdout[-600:]!r}")
            lines.append(f"stderr (tail): {r.stderr[-600:]!r}")
        lines += [f"escape: {e}" for e in self.escapes]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


# -- host-side helpers ---------------------------------------------------------------------------------------


def marked_processes(marker: str) -> dict[int, tuple[int, str]]:
    """Live processes whose command line holds `marker` -> (threads, command line)."""
    found: dict[int, tuple[int, str]] = {}
    needle, me = marker.encode(), os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            if needle not in cmdline:
                continue
            with open(f"/proc/{entry}/status") as f:
                threads = next((int(line.split()[1]) for line in f if line.startswith("Threads:")), 1)
        except (OSError, ValueError):
            continue  # gone meanwhile
        found[int(entry)] = (threads, cmdline.replace(b"\0", b" ").decode(errors="replace")[:120])
    return found


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process (zombies included), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def kill_marked(marker: str) -> None:
    for pid in marked_processes(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class TaskMonitor:
    """Counts, every 30 ms while a run lasts, the tasks (processes and threads) carrying the run's marker;
    past `brake` it kills them all (a backend that does not cap processes must not take the host down)."""

    def __init__(self, marker: str, brake: int) -> None:
        self.marker, self.brake = marker, brake
        self.peak = 0
        self.braked = False
        self.seen: dict[int, int] = {}
        """Every marked process seen -> its start time (a zombie's command line is empty: after the run,
        these pids find the ones left as zombies too)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hostile-task-monitor", daemon=True)

    def __enter__(self) -> TaskMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            found = marked_processes(self.marker)
            for pid in found:
                if pid not in self.seen:
                    stat = _stat(pid)
                    if stat is not None:
                        self.seen[pid] = stat[2]
            total = sum(threads for threads, _ in found.values())
            self.peak = max(self.peak, total)
            if total > self.brake:
                self.braked = True
                kill_marked(self.marker)
            if self._stop.wait(0.03):
                return


def written_files(ctx: Context, directories: Sequence[str]) -> list[str]:
    """Files and directories named ...written-TOKEN in `directories` (on the host)."""
    needle = f"written-{ctx.token}"
    found = []
    for directory in directories:
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            found += [entry.path for entry in entries if needle in entry.name]
    return found


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def reported(result: RunResult, key: str) -> list[int]:
    """The numbers the program printed on lines `key N` (it reports as it goes: the last may be cut off)."""
    return [int(m) for m in re.findall(rf"^{re.escape(key)} (\d+)$", result.stdout, re.MULTILINE)]


def _run_quiet(*argv: str) -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(argv, capture_output=True, timeout=10, check=False)


def _ip(*args: str) -> str:
    if shutil.which("ip") is None:
        raise SetupError(
            "needs iproute2's `ip` to build a network namespace and a veth pair: apt-get install iproute2 "
            "(rlstack sandbox setup installs it)"
        )
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if proc.returncode:
        raise SetupError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def _host_dir(ctx: Context, mode: int) -> Path:
    """A host directory outside every temp dir (a sandbox's private /tmp would hide it for the wrong
    reason), like a dataset or checkout: /var/lib/rlstack-hostile-TOKEN as root, else under $HOME."""
    base = Path("/var/lib") if os.geteuid() == 0 else Path.home()
    path = base / f"rlstack-hostile-{ctx.token}"
    path.mkdir(mode=0o755)
    ctx.stack.callback(shutil.rmtree, path, True)
    path.chmod(0o755)
    inner = path / "data"
    inner.mkdir()
    inner.chmod(mode)
    return inner


def _stop_process(proc: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(subprocess.SubprocessError):
        proc.wait(timeout=10)


# -- the cases: prepare and check ----------------------------------------------------------------------------


def _check_bounded(key: str, cap: Callable[[Limits], int], unit: str, what: str) -> Check:
    """An escape when the program reports having got more than `cap` (e.g. memory held past memory_mb)."""

    def check(result: RunResult, ctx: Context) -> list[str]:
        values = reported(result, key)
        limit = cap(ctx.limits)
        ctx.notes.append(f"{what} {max(values, default=0)} of {limit} {unit}")
        if values and max(values) > limit:
            return [f"{what}: {max(values)} {unit}, past the cap of {limit} {unit}"]
        return []

    return check


def _check_secret(result: RunResult, ctx: Context) -> list[str]:
    found = [
        name for name, text in (("stdout", result.stdout), ("stderr", result.stderr)) if ctx.secret in text
    ]
    return [f"the secret ({ctx.state['secret_from']}) shows up in its {' and '.join(found)}"] if found else []


def _prepare_host_file(ctx: Context) -> None:
    directory = _host_dir(ctx, 0o755)
    path = directory / "secret.txt"
    path.write_text(ctx.secret)
    path.chmod(0o644)
    ctx.params["path"] = str(path)
    ctx.state["secret_from"] = f"the world-readable host file {path}"


def _prepare_private_file(ctx: Context) -> None:
    path = Path.home() / f"rlstack-hostile-secret-{ctx.token}"
    ctx.stack.callback(remove, str(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(ctx.secret)
    ctx.params["path"] = str(path)
    ctx.state["secret_from"] = f"the trainer's private file {path} (mode 600)"


def _prepare_env(ctx: Context) -> None:
    old = os.environ.get(SECRET_ENV)
    os.environ[SECRET_ENV] = ctx.secret

    def restore() -> None:
        if old is None:
            os.environ.pop(SECRET_ENV, None)
        else:
            os.environ[SECRET_ENV] = old

    ctx.stack.callback(restore)
    ctx.params["name"] = SECRET_ENV
    ctx.state["secret_from"] = f"the trainer's environment variable {SECRET_ENV}"


def _prepare_drop_dir(ctx: Context) -> None:
    directory = _host_dir(ctx, 0o1777)
    ctx.params["dirs"] = [str(directory)]


def _check_written(result: RunResult, ctx: Context) -> list[str]:
    escapes = []
    for path in written_files(ctx, ctx.params["dirs"]):
        escapes.append(f"wrote {path} on the host")
        remove(path)
    return escapes


def _prepare_outside_dirs(ctx: Context) -> None:
    ctx.params["dirs"] = ["/tmp", "/var/tmp", "/dev/shm", "/etc", "/root", "/usr/local/bin", "/run", "/"]


def _host_addresses() -> list[str]:
    """127.0.0.1 and every IPv4 address of the host's interfaces (docker0's included, where it is up)."""
    found = ["127.0.0.1"]
    if shutil.which("ip"):
        out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False)
        for line in out.stdout.splitlines():
            fields = line.split()
            if "inet" in fields:
                address = fields[fields.index("inet") + 1].split("/")[0]
                if address not in found:
                    found.append(address)
    return found


def _prepare_loopback_listener(ctx: Context) -> None:
    server = socket.create_server(("0.0.0.0", 0), backlog=64)
    ctx.stack.callback(server.close)
    server.setblocking(False)
    ctx.state["server"] = server
    ctx.params["port"] = server.getsockname()[1]
    ctx.params["hosts"] = _host_addresses()


def _accepted(server: socket.socket) -> list[str]:
    """Connections waiting in the listener's queue (the kernel completes the handshake without accept)."""
    peers: list[str] = []
    while True:
        try:
            conn, peer = server.accept()
        except BlockingIOError:
            return peers
        conn.close()
        peers.append(f"{peer[0]}:{peer[1]}")


def _check_loopback(result: RunResult, ctx: Context) -> list[str]:
    time.sleep(0.1)
    peers = _accepted(ctx.state["server"])
    if peers:
        return [
            f"connected to the host's TCP listener on port {ctx.params['port']} (from {', '.join(peers)})"
        ]
    return []


_NS_LISTENER = """\
import socket
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 0))
server.listen(64)
print(server.getsockname()[1], flush=True)
while True:
    conn, peer = server.accept()
    print(peer[0], peer[1], flush=True)
    conn.close()
"""


def _prepare_netns(ctx: Context) -> None:
    """A network namespace of the test's own, joined to the host by a veth pair (10.233.X.Y/30, never a real
    outside address), with a TCP listener inside; an unsandboxed control connection must reach it."""
    if os.geteuid() != 0:
        raise SetupError("needs root (CAP_NET_ADMIN) to create a network namespace and a veth pair")
    short = ctx.token[:8]
    netns, host_if, ns_if = f"rlstack-hostile-{short}", f"rlh{short}h", f"rlh{short}n"
    block, base = secrets.randbelow(256), secrets.randbelow(64) * 4
    host_addr, ns_addr = f"10.233.{block}.{base + 1}", f"10.233.{block}.{base + 2}"
    _ip("-V")  # the install hint, before anything is made
    ctx.stack.callback(_run_quiet, "ip", "link", "del", host_if)  # clean-ups run last-in first-out
    ctx.stack.callback(_run_quiet, "ip", "netns", "del", netns)
    _ip("netns", "add", netns)
    _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
    _ip("link", "set", ns_if, "netns", netns)
    _ip("addr", "add", f"{host_addr}/30", "dev", host_if)
    _ip("link", "set", host_if, "up")
    _ip("-n", netns, "addr", "add", f"{ns_addr}/30", "dev", ns_if)
    _ip("-n", netns, "link", "set", ns_if, "up")
    _ip("-n", netns, "link", "set", "lo", "up")
    _ip("-n", netns, "route", "add", "default", "via", host_addr)  # replies find their way back
    listener = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-I", "-S", "-c", _NS_LISTENER],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    ctx.stack.callback(_stop_process, listener)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert listener.stdout is not None
        for line in listener.stdout:
            lines.put(line.strip())

    threading.Thread(target=read, name="hostile-netns-listener", daemon=True).start()
    try:
        port = int(lines.get(timeout=10))
    except (queue.Empty, ValueError) as e:
        raise SetupError(f"the listener in network namespace {netns} did not start ({e!r})") from e
    try:
        with socket.create_connection((ns_addr, port), timeout=3) as control:
            control_peer = "{} {}".format(*control.getsockname()[:2])
    except OSError as e:
        raise SetupError(f"the unsandboxed control connection to {ns_addr}:{port} failed: {e}") from e
    try:
        seen = lines.get(timeout=3)
    except queue.Empty as e:
        raise SetupError(f"the listener at {ns_addr}:{port} did not record the control connection") from e
    if seen != control_peer:
        raise SetupError(f"the listener recorded {seen!r}, not the control connection {control_peer!r}")
    ctx.params.update(address=ns_addr, port=port)
    ctx.state["lines"] = lines


def _check_netns(result: RunResult, ctx: Context) -> list[str]:
    time.sleep(0.2)
    lines: queue.Queue[str] = ctx.state["lines"]
    peers = []
    while not lines.empty():
        peers.append(lines.get())
    if peers:
        address, port = ctx.params["address"], ctx.params["port"]
        return [f"reached the listener in another network namespace at {address}:{port} (from {peers})"]
    return []


def _check_interfaces(result: RunResult, ctx: Context) -> list[str]:
    match = re.search(r"^interfaces (.*)$", result.stdout, re.MULTILINE)
    if not match:
        return []
    others = [name for name in match.group(1).split() if name != "lo"]
    return [f"has network interfaces besides loopback: {', '.join(others)}"] if others else []


def _prepare_canaries(ctx: Context) -> None:
    """Host processes the program tries to kill: one as the trainer's user, one as nobody (when root)."""
    canaries = [subprocess.Popen(["sleep", "300"])]
    if os.geteuid() == 0:
        canaries.append(subprocess.Popen(["sleep", "300"], user=65534, group=65534, extra_groups=[]))
    for canary in canaries:
        ctx.stack.callback(_stop_process, canary)
    ctx.state["canaries"] = canaries
    ctx.params["canaries"] = [c.pid for c in canaries]


def _check_canaries(result: RunResult, ctx: Context) -> list[str]:
    time.sleep(0.1)
    dead = [c for c in ctx.state["canaries"] if c.poll() is not None]
    return [f"killed a host process (canary pid {c.pid}, {c.returncode})" for c in dead]


def _prepare_rss(ctx: Context) -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    ctx.state["rss_kib"] = _status_kib("VmRSS")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _check_output_flood(result: RunResult, ctx: Context) -> list[str]:
    escapes = []
    grown = (_status_kib("VmHWM") - ctx.state["rss_kib"]) >> 10
    ctx.notes.append(f"kept {len(result.stdout) >> 10} KiB, the trainer grew {grown} MiB")
    if grown > 32:
        escapes.append(f"the trainer's memory grew by {grown} MiB while reading its output")
    if "stdout" not in result.truncated:
        escapes.append(f"stdout not marked as truncated (kept {len(result.stdout)} characters)")
    return escapes


# -- the programs --------------------------------------------------------------------------------------------

_HEADER = 'P = {params!r}\nTOKEN = P["token"]\nprint("started", flush=True)\n'

FORK_BOMB = """\
import os, time
forks = 0
while True:
    if forks < 8:  # each line of descent forks 8 times: at most 256 processes, far past any cap
        try:
            os.fork()
            forks += 1
        except OSError:
            time.sleep(0.005)
    else:
        time.sleep(0.05)
"""

THREAD_BOMB = """\
import threading
threading.stack_size(256 * 1024)
stop = threading.Event()
started = 0
try:
    while started < 1000:
        threading.Thread(target=stop.wait, daemon=True).start()
        started += 1
        print("threads", started + 1, flush=True)
except (RuntimeError, MemoryError) as e:
    print("stopped:", type(e).__name__, e, flush=True)
"""

MEMORY_BOMB = """\
held = []
try:
    while len(held) < 128:  # at most 1 GiB
        held.append(b"x" * (8 << 20))  # written, so resident
        print("held", len(held) * 8, flush=True)
except MemoryError:
    print("stopped: MemoryError", flush=True)
"""

CHILDREN_MEMORY = """\
import os, select, time
r, w = os.pipe()
kids = []
for i in range(8):
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            block = b"x" * (48 << 20)
            os.write(w, b"1")
        except MemoryError:
            os.write(w, b"0")
        time.sleep(60)
        os._exit(0)
    kids.append(pid)
os.close(w)
holding, deadline = 0, time.monotonic() + 1.5
while holding < 8 and time.monotonic() < deadline:
    if select.select([r], [], [], max(deadline - time.monotonic(), 0))[0]:
        data = os.read(r, 64)
        if not data:
            break
        holding += data.count(b"1")
time.sleep(0.2)
alive = sum(1 for pid in kids if os.waitpid(pid, os.WNOHANG)[0] == 0)
print("reported", holding, "alive", alive, flush=True)
print("together", 48 * min(holding, alive), flush=True)  # held at once, MiB
for pid in kids:
    try:
        os.kill(pid, 9)
    except OSError:
        pass
"""

INFINITE_LOOP = """\
while True:
    pass
"""

SLEEP_FOREVER = """\
import time
while True:
    time.sleep(3600)
"""

IGNORE_SIGTERM = """\
import os, signal, time
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, signal.SIG_IGN)
os.fork()
os.fork()  # four of us, all deaf
while True:
    try:
        time.sleep(0.1)
    except BaseException:
        pass
"""

DAEMON = """\
import os, signal, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # the daemon: a new session, re-parented, deaf, stdio closed
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.write(w, b"up")
        while True:
            time.sleep(1)
    os._exit(0)
os.wait()
os.close(w)
print("daemon", os.read(r, 2).decode(), flush=True)
"""

KILL_OTHERS = """\
import os, signal
reachable = []
for pid in P["canaries"]:
    try:
        os.kill(pid, 0)
        reachable.append(pid)
    except OSError as e:
        print("canary", pid, "not reachable:", e.strerror, flush=True)
print("parent", os.getppid(), flush=True)
for pid in [os.getppid(), 1, *P["canaries"]]:
    try:
        os.kill(pid, signal.SIGKILL)
        print("sent SIGKILL to", pid, flush=True)
    except OSError as e:
        print("SIGKILL to", pid, "failed:", e.strerror, flush=True)
# kill -1 only where the trainer's own canary is out of reach: a backend that lets it through must not
# take down the machine running this suite (the canaries' deaths already say it escaped).
if P["canaries"][0] not in reachable:
    try:
        os.kill(-1, signal.SIGKILL)
        print("kill -1 sent", flush=True)
    except OSError as e:
        print("kill -1 failed:", e.strerror, flush=True)
print("still here", flush=True)
"""

TCP_LOOPBACK = """\
import socket
for host in P["hosts"]:
    try:
        with socket.create_connection((host, P["port"]), timeout=1) as s:
            s.sendall(TOKEN.encode())
        print("connected to", host, flush=True)
    except OSError as e:
        print("no connection to", host, "-", e, flush=True)
"""

TCP_NETNS = """\
import socket
try:
    with socket.create_connection((P["address"], P["port"]), timeout=2) as s:
        s.sendall(TOKEN.encode())
    print("connected", flush=True)
except OSError as e:
    print("no connection -", e, flush=True)
"""

INTERFACES = """\
import os, socket
print("interfaces", " ".join(sorted(name for _, name in socket.if_nameindex())), flush=True)
try:
    print("sysfs", " ".join(sorted(os.listdir("/sys/class/net"))))
except OSError as e:
    print("sysfs unreadable", e)
"""

WRITE_FILES = """\
import os
for directory in P["dirs"]:
    path = os.path.join(directory, "rlstack-hostile-written-" + TOKEN)
    try:
        with open(path, "w") as f:
            f.write(TOKEN)
        print("wrote", path, flush=True)
    except OSError as e:
        print("cannot write", path, "-", e.strerror, flush=True)
"""

READ_FILE = """\
try:
    print("read:", open(P["path"]).read(), flush=True)
except OSError as e:
    print("cannot read", P["path"], "-", e.strerror, flush=True)
"""

READ_ENV = """\
import os
print("own environment:", os.environ.get(P["name"]), flush=True)
needle = (P["name"] + "=").encode()
for pid in os.listdir("/proc"):  # every process's environment it can read: the trainer's, a launcher's
    if not pid.isdigit():
        continue
    try:
        with open("/proc/%s/environ" % pid, "rb") as f:
            data = f.read()
    except OSError:
        continue
    for item in data.split(b"\\0"):
        if item.startswith(needle):
            print("found in", pid, ":", item.decode(errors="replace"), flush=True)
"""

PRINT_100MB = """\
import sys
chunk = b"y" * (1 << 20)
for _ in range(100):
    sys.stdout.buffer.write(chunk)
sys.stdout.flush()
"""

EXHAUST_FDS = """\
import os
fds = []
try:
    while len(fds) < 100000:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as e:
    print("stopped:", e.strerror, flush=True)
print("open", len(fds) + 3, flush=True)
"""

RAISE_LIMITS = """\
import os, resource, signal, time
INF = resource.RLIM_INFINITY
for name in ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_CPU"):
    which = getattr(resource, name)
    soft, hard = resource.getrlimit(which)
    for wanted in ((INF, INF), (hard, hard)):
        try:
            resource.setrlimit(which, wanted)
            print("set", name, wanted, "(was", (soft, hard), ")", flush=True)
            break
        except (ValueError, OSError) as e:
            print("cannot set", name, wanted, "-", e, flush=True)
# What the raised limits let it do, cheapest first (memory last: an OOM kill may end the run there).
fds = []
try:
    while len(fds) < 4 * P["open_files"]:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
print("open", len(fds) + 3, flush=True)
for fd in fds:
    os.close(fd)
written = 0
try:
    with open("big", "wb", buffering=0) as f:
        while written < 2 * P["file_size_mb"]:
            f.write(b"z" * (1 << 20))
            written += 1
except OSError:
    pass
print("file", written, flush=True)
os.unlink("big")
kids = []
try:
    while len(kids) < 2 * P["max_processes"]:
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        kids.append(pid)
except OSError:
    pass
print("processes", len(kids) + 1, flush=True)
for pid in kids:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
held = []
try:
    while len(held) * 8 < 2 * P["memory_mb"]:
        held.append(b"x" * (8 << 20))
        print("held", len(held) * 8, flush=True)
except MemoryError:
    print("stopped: MemoryError", flush=True)
"""

DISK_BIG_FILE = """\
import os
written, chunk = 0, b"z" * (1 << 20)
fd = os.open("big", os.O_WRONLY | os.O_CREAT, 0o644)
try:
    while written < 4 * P["disk_mb"] << 20:  # at most 4x the cap
        written += os.write(fd, chunk)
        print("wrote", written >> 20, flush=True)
except OSError as e:
    print("stopped:", e.strerror, flush=True)
"""

DISK_SMALL_FILES = """\
import os
written, files, chunk = 0, 0, b"s" * (32 << 10)
os.mkdir("many")
try:
    while written < 4 * P["disk_mb"] << 20:  # at most 4x the cap
        with open("many/%06d" % files, "wb") as f:
            f.write(chunk)
        files += 1
        written += len(chunk)
        if files % 32 == 0:
            print("wrote", written >> 20, flush=True)
except OSError as e:
    print("stopped:", e.strerror, "after", files, "files", flush=True)
print("wrote", written >> 20, flush=True)
"""

FILL_TMP = """\
import os
chunk = b"t" * (1 << 20)
for directory in P["dirs"]:
    written = 0
    try:
        while written < 4 * P["tmp_mb"] << 20:  # at most 4x the cap, in 1 MiB files (not one capped file)
            name = "rlstack-hostile-written-%s-fill-%d" % (TOKEN, written >> 20)
            with open(os.path.join(directory, name), "wb") as f:
                f.write(chunk)
            written += len(chunk)
    except OSError as e:
        print("stopped in", directory, ":", e.strerror, flush=True)
    print("wrote", written >> 20, flush=True)
"""


def _with_limits(*names: str) -> Callable[[Context], None]:
    """A prepare step that passes some of the run's limits to the program."""

    def prepare(ctx: Context) -> None:
        for name in names:
            ctx.params[name] = getattr(ctx.limits, name)

    return prepare


def _prepare_fill_tmp(ctx: Context) -> None:
    ctx.params.update(tmp_mb=ctx.limits.tmp_mb, dirs=["/tmp", "/dev/shm"])


def _both(*checks: Check) -> Check:
    def check(result: RunResult, ctx: Context) -> list[str]:
        return [escape for one in checks for escape in one(result, ctx)]

    return check


def _check_raised(result: RunResult, ctx: Context) -> list[str]:
    escapes = []
    for key, cap, unit in (
        ("open", ctx.limits.open_files, "file descriptors"),
        ("file", ctx.limits.file_size_mb, "MiB in one file"),
        ("processes", ctx.limits.max_processes, "processes"),
        ("held", ctx.limits.memory_mb, "MiB held"),
    ):
        values = reported(result, key)
        ctx.notes.append(f"{key} {max(values, default=0)}/{cap}")
        if values and max(values) > cap:
            escapes.append(f"after raising its limits: {max(values)} {unit}, past the cap of {cap}")
    return escapes


RAISE = replace(BASE_LIMITS, max_processes=16, open_files=32, file_size_mb=4, disk_mb=64)

CASES: tuple[HostileCase, ...] = (
    # The fork bomb's processes are counted by the task monitor (common checks), like every case's.
    HostileCase(
        "fork_bomb", "fork bomb (at most 256 processes; cap 32)", FORK_BOMB, SHORT, check_sandbox_after=True
    ),
    HostileCase(
        "thread_bomb",
        "thread bomb",
        THREAD_BOMB,
        check=_check_bounded("threads", lambda lim: lim.max_processes, "threads", "ran"),
        check_sandbox_after=True,
    ),
    HostileCase(
        "memory_bomb",
        "memory bomb (8 MiB blocks up to 1 GiB; cap 128 MiB)",
        MEMORY_BOMB,
        check=_check_bounded("held", lambda lim: lim.memory_mb, "MiB", "held"),
        may_crash=True,
    ),
    HostileCase(
        "children_memory",
        "8 forked children holding 48 MiB each (per-run cap 128 MiB)",
        CHILDREN_MEMORY,
        check=_check_bounded("together", lambda lim: lim.memory_mb, "MiB", "its processes held together"),
        may_crash=True,
    ),
    HostileCase("infinite_loop", "infinite loop", INFINITE_LOOP, SHORT),
    HostileCase("sleep_forever", "sleep forever", SLEEP_FOREVER, SHORT),
    HostileCase("ignore_sigterm", "ignore SIGTERM (4 processes)", IGNORE_SIGTERM, SHORT),
    HostileCase("daemon", "double-forked daemon (new session, deaf, stdio closed)", DAEMON),
    HostileCase(
        "kill_others",
        "kill its parent, pid 1, host canaries, `kill -1`",
        KILL_OTHERS,
        prepare=_prepare_canaries,
        check=_check_canaries,
        check_sandbox_after=True,
    ),
    HostileCase(
        "tcp_loopback",
        "TCP to the host's listener (127.0.0.1 and the host's addresses)",
        TCP_LOOPBACK,
        prepare=_prepare_loopback_listener,
        check=_check_loopback,
    ),
    HostileCase(
        "tcp_netns",
        "TCP to a listener in a network namespace of the test's own (veth; control reaches it)",
        TCP_NETNS,
        prepare=_prepare_netns,
        check=_check_netns,
    ),
    HostileCase("loopback_only", "no interface but loopback inside", INTERFACES, check=_check_interfaces),
    HostileCase(
        "write_outside",
        "write outside the work dir (/tmp, /var/tmp, /dev/shm, /etc, /root, /usr/local/bin, /run, /)",
        WRITE_FILES,
        prepare=_prepare_outside_dirs,
        check=_check_written,
    ),
    HostileCase(
        "write_host_dir",
        "write to a world-writable host directory",
        WRITE_FILES,
        prepare=_prepare_drop_dir,
        check=_check_written,
    ),
    HostileCase(
        "read_host_file",
        "read a world-readable host file the test places",
        READ_FILE,
        prepare=_prepare_host_file,
        check=_check_secret,
    ),
    HostileCase(
        "read_private_file",
        "read the trainer's private file (mode 600)",
        READ_FILE,
        prepare=_prepare_private_file,
        check=_check_secret,
    ),
    HostileCase(
        "read_trainer_env",
        "read the trainer's environment variables (own and /proc/*/environ)",
        READ_ENV,
        prepare=_prepare_env,
        check=_check_secret,
    ),
    HostileCase(
        "print_100mb",
        "print 100 MB",
        PRINT_100MB,
        replace(BASE_LIMITS, wall_seconds=15),
        prepare=_prepare_rss,
        check=_check_output_flood,
    ),
    HostileCase(
        "exhaust_fds",
        "exhaust file descriptors",
        EXHAUST_FDS,
        check=_check_bounded("open", lambda lim: lim.open_files, "descriptors", "opened"),
        check_sandbox_after=True,
    ),
    HostileCase(
        "raise_limits",
        "raise its own limits, then use them",
        RAISE_LIMITS,
        RAISE,
        prepare=_with_limits("open_files", "file_size_mb", "max_processes", "memory_mb"),
        check=_check_raised,
        may_crash=True,
    ),
    HostileCase(
        "disk_big_file",
        "fill the disk with one big file (disk cap 16 MiB, file cap 64 MiB)",
        DISK_BIG_FILE,
        replace(BASE_LIMITS, file_size_mb=64),
        prepare=_with_limits("disk_mb"),
        check=_check_bounded("wrote", lambda lim: lim.disk_mb, "MiB", "wrote"),
    ),
    HostileCase(
        "disk_small_files",
        "fill the disk with many small files (32 KiB each)",
        DISK_SMALL_FILES,
        prepare=_with_limits("disk_mb"),
        check=_check_bounded("wrote", lambda lim: lim.disk_mb, "MiB", "wrote"),
    ),
    HostileCase(
        "fill_tmp",
        "fill /tmp and /dev/shm (tmp cap 16 MiB)",
        FILL_TMP,
        prepare=_prepare_fill_tmp,
        check=_both(
            _check_bounded("wrote", lambda lim: lim.tmp_mb, "MiB", "wrote to a temp dir"), _check_written
        ),
    ),
)


# -- known gaps and running ----------------------------------------------------------------------------------


def known_gaps(backend: str, sandbox: Sandbox) -> dict[str, str]:
    """The cases `backend` cannot contain by design, with why: only the process backend has any (it has no
    filesystem of its own and caps memory and disk per process or file); which ones depends on what the
    kernel lets it do here (`ProcessSandbox.isolation`). A strict backend has none."""
    if backend != "process":
        return {}
    from rlstack.envs.process import ProcessSandbox

    assert isinstance(sandbox, ProcessSandbox)
    iso = sandbox.isolation
    gaps = {
        "read_host_file": "host files visible (no filesystem of its own)",
        "write_host_dir": "writes wherever its uid may (no filesystem of its own)",
        "children_memory": "memory capped per process (RLIMIT_AS), not per run",
        "disk_big_file": "disk capped per file (RLIMIT_FSIZE), not per run",
        "disk_small_files": "disk capped per file (RLIMIT_FSIZE), not per run",
    }
    if not iso.own_uid:
        gaps["read_private_file"] = "runs as the trainer's own user (not root here): its files are readable"
    if not iso.network_isolated:
        reason = "no network namespace on this host: it has the host's network"
        gaps.update(tcp_loopback=reason, tcp_netns=reason, loopback_only=reason)
    if "mount" not in iso.namespaces:
        gaps["fill_tmp"] = "no mount namespace on this host: the host's /tmp, uncapped"
        if not iso.own_uid:
            gaps["write_outside"] = "no mount namespace and no uid of its own: writes the host's /tmp"
    if "pid" not in iso.namespaces and not iso.own_uid:
        gaps["read_trainer_env"] = "no pid namespace and no uid of its own: reads /proc/<trainer>/environ"
        gaps["kill_others"] = "no pid namespace and no uid of its own: signals the trainer's processes"
    return gaps


class Unsandboxed(Sandbox):
    """No isolation at all: the control that shows the checks are not vacuous (each case in
    CAUGHT_UNSANDBOXED must report an escape under it). The command runs in a temp dir with the trainer's
    environment, as nobody when we are root (so it cannot write /etc or /root for real), and at the
    wall-clock limit only the command itself is killed."""

    name = "unsandboxed"

    def run(
        self,
        command: Sequence[str],
        files: Files | None = None,
        stdin: str | bytes = "",
        limits: Limits | None = None,
    ) -> RunResult:
        limits = limits or Limits()
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        argv = [python if c == "python3" else c for c in command]
        root = os.geteuid() == 0
        with tempfile.TemporaryDirectory(prefix="rlstack-hostile-control-") as work:
            os.chmod(work, 0o777)
            for name, content in (files or {}).items():
                Path(work, name).write_bytes(content.encode() if isinstance(content, str) else content)
            start = time.monotonic()
            proc = subprocess.Popen(
                argv,
                cwd=work,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                user=65534 if root else None,
                group=65534 if root else None,
                extra_groups=[] if root else None,
            )
            try:
                out, err = proc.communicate(
                    stdin.encode() if isinstance(stdin, str) else stdin, limits.wall_seconds
                )
                status: RunStatus = "ok"
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                status = "timeout"
        code = proc.returncode if status == "ok" else None
        return RunResult(
            status, code, out.decode(errors="replace"), err.decode(errors="replace"), time.monotonic() - start
        )


CAUGHT_UNSANDBOXED = (
    "thread_bomb",
    "memory_bomb",
    "children_memory",
    "daemon",
    "tcp_loopback",
    "tcp_netns",
    "loopback_only",
    "write_outside",
    "write_host_dir",
    "read_host_file",
    "read_trainer_env",
    "print_100mb",
    "exhaust_fds",
    "raise_limits",
    "disk_big_file",
    "disk_small_files",
    "fill_tmp",
)
"""The cases whose escape `Unsandboxed` shows. Not run there: the fork bomb (a real load on the host),
the kill case (it would kill the trainer), the endless ones (the control itself stops them at the wall
clock; ignore_sigterm's children would hold its pipes), the private file (the control runs as nobody)."""


def open_backend(name: str) -> Sandbox | str:
    """A sandbox of backend `name`, or why this host cannot run it (and how to get it)."""
    try:
        cls = backend_class(name)
    except ImportError as e:
        return f"sandbox backend '{name}' cannot be imported: {e}"
    missing = cls.unavailable()
    if missing:
        return f"sandbox backend '{name}' cannot run on this host: {missing}"
    try:
        return get_sandbox(name)
    except SandboxError as e:
        return str(e)


def _alive(sandbox: Sandbox, limits: Limits) -> str | None:
    """None when the sandbox still runs a trivial command (under the case's limits: a warm container of
    the docker backend's pool fits them); else what happened."""
    try:
        result = sandbox.run(["python3", "-c", "print('alive')"], limits=replace(limits, wall_seconds=30))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None if result.stdout == "alive\n" else f"{result.describe()}, stderr {result.stderr[-200:]!r}"


def run_case(sandbox: Sandbox, backend: str, case: HostileCase) -> Outcome:
    """Prepare, run the program once in `sandbox`, check from the host, clean up (always)."""
    token = secrets.token_hex(8)
    outcome = Outcome(case, backend)
    started = time.monotonic()
    with ExitStack() as stack:
        ctx = Context(token, secrets.token_hex(16), case.limits, backend, stack, params={"token": token})
        stack.callback(kill_marked, token)
        try:
            if case.prepare is not None:
                case.prepare(ctx)
        except (SetupError, OSError, subprocess.SubprocessError) as e:
            outcome.problems.append(f"set-up failed: {e}")
            outcome.seconds = time.monotonic() - started
            return outcome
        source = _HEADER.format(params=ctx.params) + case.program
        monitor = TaskMonitor(token, brake=4 * case.limits.max_processes)
        run_start = time.monotonic()
        with monitor:
            try:
                outcome.result = sandbox.run(
                    ["python3", "main.py", token], files={"main.py": source}, limits=case.limits
                )
            except Exception as e:  # a backend bug: report it with the rest
                outcome.problems.append(f"sandbox.run raised {type(e).__name__}: {e}")
        elapsed = time.monotonic() - run_start
        outcome.common_escapes += _common_checks(ctx, monitor, elapsed, outcome.result)
        result = outcome.result
        if result is not None:
            if result.status == "error":
                outcome.problems.append(f"the sandbox reported an error: {result.detail}")
            elif not result.stdout.startswith("started\n"):
                outcome.problems.append(
                    f"the program did not start ({result.describe()}; stderr {result.stderr[-300:]!r})"
                )
            elif "Traceback" in result.stderr and not case.may_crash:
                outcome.problems.append(f"the program crashed: {result.stderr[-300:]!r}")
            if case.check is not None:
                outcome.case_escapes += case.check(result, ctx)
            if case.name == "fork_bomb":  # (threads come and go faster than the monitor samples)
                ctx.notes.append(f"at most {monitor.peak} tasks, the backend's own included")
        outcome.notes = ctx.notes
        if case.check_sandbox_after:
            broken = _alive(sandbox, case.limits)
            if broken:
                outcome.common_escapes.append(f"the sandbox no longer runs commands afterwards: {broken}")
    outcome.seconds = time.monotonic() - started
    return outcome


def _survivors(marker: str, monitor: TaskMonitor) -> tuple[dict[int, str], dict[int, int]]:
    """The run's processes still there: live ones (pid -> command line), zombies (pid -> parent pid)."""
    live = {pid: cmd for pid, (_, cmd) in marked_processes(marker).items()}
    zombies = {}
    for pid, started in monitor.seen.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == started:
            if stat[0] == "Z":
                zombies[pid] = stat[1]
            elif pid not in live:
                live[pid] = "(command line changed)"
    return live, zombies


def _common_checks(ctx: Context, monitor: TaskMonitor, elapsed: float, result: RunResult | None) -> list[str]:
    escapes = []
    limits = ctx.limits
    if elapsed > limits.wall_seconds + WALL_GRACE_SECONDS:
        escapes.append(
            f"the run took {elapsed:.1f} s, past its wall-clock limit of {limits.wall_seconds:g} s"
        )
    left, zombies = _survivors(ctx.token, monitor)
    if left or zombies:
        time.sleep(0.3)  # one being killed right now is not a survivor
        left, zombies = _survivors(ctx.token, monitor)
    if left:
        listed = "; ".join(f"pid {pid}: {cmd}" for pid, cmd in sorted(left.items())[:3])
        escapes.append(f"{len(left)} of its processes outlived the run by 0.3 s and more ({listed})")
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    if zombies:
        listed = ", ".join(f"pid {pid} (parent {parent})" for pid, parent in sorted(zombies.items())[:3])
        escapes.append(f"left {len(zombies)} zombie(s), unreaped 0.3 s after the run returned: {listed}")
    if monitor.peak > limits.max_processes + PROCESS_SLACK:
        braked = " (the host killed them)" if monitor.braked else ""
        escapes.append(
            f"{monitor.peak} of its processes and threads ran at once{braked}, past the cap of "
            f"{limits.max_processes}"
        )
    claimed = ctx.params.get("dirs", [])  # a write case checks those itself
    for path in written_files(ctx, [d for d in HOST_DIRS if d not in claimed]):
        escapes.append(f"wrote {path} on the host")
        remove(path)
    if result is not None:
        for name in ("stdout", "stderr"):
            size = len(getattr(result, name).encode())
            if size > limits.max_output_bytes + OUTPUT_MARKER_ROOM:
                escapes.append(f"{size} bytes of {name} came back, past the cap of {limits.max_output_bytes}")
    try:
        subprocess.run(["true"], check=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        escapes.append(f"the host cannot start a process afterwards: {e}")
    return escapes
