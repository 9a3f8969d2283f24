"""`BubblewrapSandbox`: each run in fresh Linux namespaces made by bubblewrap (`bwrap`), on a minimal
read-only root, inside its own memory and pids cgroups (`rlstack.envs.cgroups`). Needs bwrap 0.7+ (Debian
12: `apt-get install bubblewrap`, or `rlstack sandbox setup`), user namespaces, and writable cgroups (root,
or a delegated cgroup).

What a run gets:
- namespaces: user, pid, mount, network (unless `Limits.network`: then the host's network, localhost
  included), IPC, UTS, cgroup; a new session (no terminal to inject input into), no capabilities, and no
  further user namespaces (`--disable-userns`, bwrap 0.8+). It runs as uid/gid 1000 ("sandbox") inside;
  as root we first drop to a fresh unprivileged host uid (random, used by nothing else), so even a kernel
  bug that leaks out of the namespaces lands on a user that owns nothing;
- a root it cannot write: the host's /usr read-only (with /bin, /lib... as on the host), a synthetic /etc
  (passwd, group, and the dynamic loader's cache only; with the network also resolv.conf, hosts and the
  CA certificates), its own /proc, a minimal /dev; nothing else of the host: no /home, /root, /tmp, /var,
  /work, no sockets, no checkout, no venv. `python3` is the host's /usr/bin/python3 run as `-I -S`: the
  standard library only;
- writable: the working directory /work (a tmpfs of `Limits.disk_mb` holding the given files; also HOME),
  /tmp (= /var/tmp) and /dev/shm (tmpfs of `Limits.tmp_mb` each); tmpfs pages count as the run's memory;
- limits: memory and processes of the whole run (cgroup: `memory_mb`, no swap; `max_processes`, threads
  included, so a fork bomb stops there); per process CPU time, file size, open files (rlimits, set inside
  by util-linux `prlimit` before the command), no core dumps; wall-clock time: then the whole run is
  killed. bwrap's sandbox process joins the run's cgroups while it waits on `--block-fd`, before the
  command exists, so every process of the run is counted;
- when the command exits or times out, every process it started is killed: its pid 1 (a shell, see
  `_INIT`) exits with it, which ends the pid namespace, then whatever is left in its cgroups is killed
  and the cgroups removed. bwrap reaps that pid 1 itself: nothing of a run is orphaned to the host.

What it does NOT isolate: it shares the host kernel (no seccomp filter: a kernel exploit escapes it), the
machine's CPUs (no CPU share is set) and memory bandwidth; it can read everything under the host's /usr;
with `Limits.network` it has the host's full network.

Exit statuses pass through a shell, which reports a command killed by signal N as exit code 128 + N: an
exit code of 129-192 reads as "killed" by that signal. Cost: about 10 ms more than the process backend
per run (bwrap's set-up; joining two cgroup v1 hierarchies takes a few ms of kernel synchronisation).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from functools import cache
from pathlib import PurePosixPath

from rlstack.envs.cgroups import PREFIX, CgroupError, RunCgroup
from rlstack.envs.cgroups import unavailable as cgroups_unavailable
from rlstack.envs.process import _UID_BASE, _UID_SPAN, _communicate
from rlstack.envs.sandbox import (
    Files,
    Limits,
    RunResult,
    RunStatus,
    Sandbox,
    SandboxError,
    check_command,
    checked_files,
    truncate,
)

SANDBOX_UID = 1000
"""The uid and gid the command has inside the sandbox (its host uid is another: see the module docs)."""
WORKDIR = "/work"
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": WORKDIR,
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "USER": "sandbox",
    "LOGNAME": "sandbox",
}
_PASSWD = f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:{WORKDIR}:/bin/sh\n".encode()
_GROUP = f"sandbox:x:{SANDBOX_UID}:\n".encode()
_NETWORK_ETC = ("resolv.conf", "hosts", "nsswitch.conf", "host.conf", "gai.conf", "ssl", "ca-certificates")
_TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")  # symlinks into /usr, or bound read-only
_MIN_VERSION = (0, 7)  # --size for tmpfs
_SETUP_SECONDS = 30.0  # bwrap's own set-up, before the command runs, at most
# The sandbox's pid 1 (bwrap --as-pid-1, so that bwrap itself reaps it and no process of the run is ever
# orphaned to the host's init): a shell that runs the command as pid 2, reaps whatever is re-parented to it
# while it waits, and exits with its status; the kernel then kills everything left in the pid namespace.
_INIT = '"$@"; exit $?'
_SETUP_HINT = "apt-get install bubblewrap, or run `rlstack sandbox setup`"


@cache
def _find_tools() -> tuple[str, tuple[int, ...], str] | str:
    """(path, version) of bwrap and the path of prlimit, or why they cannot be used."""
    prlimit = next((p for p in ("/usr/bin/prlimit", "/usr/sbin/prlimit") if os.access(p, os.X_OK)), None)
    if prlimit is None:
        return "prlimit (util-linux) is missing from /usr/bin: apt-get install util-linux"
    path = shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")
    if path is None:
        return f"bubblewrap (bwrap) is not installed: {_SETUP_HINT}"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{path} does not run ({e}): {_SETUP_HINT}"
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    version = tuple(int(p) for p in match.groups(default="0")) if match else (0, 0, 0)
    if version[:2] < _MIN_VERSION:
        return (
            f"{path} is bubblewrap {'.'.join(map(str, version))}; 0.7 or newer is needed (sized tmpfs): "
            f"{_SETUP_HINT}"
        )
    return path, version, prlimit


def _default_python() -> str | None:
    for path in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _userns_hint(stderr: str) -> str:
    """Which host setting refuses namespaces, from bwrap's complaint and the sysctls."""
    for path, bad, setting in (
        ("/proc/sys/user/max_user_namespaces", "0", "sysctl user.max_user_namespaces is 0"),
        ("/proc/sys/kernel/unprivileged_userns_clone", "0", "sysctl kernel.unprivileged_userns_clone is 0"),
        (
            "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            "1",
            "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns "
            "is 1: set it to 0, or give bwrap an AppArmor profile)",
        ),
    ):
        with contextlib.suppress(OSError), open(path) as f:
            if f.read().strip() == bad:
                return setting
    return "namespaces refused"


class BubblewrapSandbox(Sandbox):
    """Runs each command under bubblewrap in its own namespaces and cgroups (module docstring).

    python: the interpreter that `python3`/`python` in a command stands for, run with `-I -S` (default:
    /usr/bin/python3, else /usr/local/bin/python3); it must lie under /usr or `ro_binds`. ro_binds: more
    host paths the sandbox may read (bound read-only at the same place, e.g. an interpreter's prefix).
    """

    name = "bubblewrap"
    strict = True

    def __init__(self, python: str | None = None, ro_binds: Sequence[str] = ()) -> None:
        found = _find_tools()
        if isinstance(found, str):
            raise SandboxError(found)
        self._bwrap, self._version, self._prlimit = found
        self.python = python or _default_python()
        if isinstance(ro_binds, str) or not all(os.path.isabs(p) for p in ro_binds):
            raise ValueError(f"ro_binds must be a list of absolute paths, got {ro_binds!r}")
        self.ro_binds = tuple(ro_binds)
        self._own_uid = os.geteuid() == 0

    @classmethod
    def unavailable(cls) -> str | None:
        return _probe()

    # -- running ------------------------------------------------------------------------------------------

    def run(
        self,
        command: Sequence[str],
        files: Files | None = None,
        stdin: str | bytes = "",
        limits: Limits | None = None,
    ) -> RunResult:
        argv = check_command(command)
        if argv[0] in ("python3", "python"):
            if self.python is None:
                raise SandboxError("no python3 under /usr for the bubblewrap sandbox; pass python=...")
            argv = [self.python, "-I", "-S", *argv[1:]]
        entries = checked_files(files or {})
        limits = limits or Limits()
        data = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
        try:
            cgroup = RunCgroup.create(limits.memory_mb << 20, limits.max_processes + 1)  # + the init shell
            try:
                return self._run(argv, entries, data, limits, cgroup)
            finally:
                cgroup.remove()
        except (CgroupError, SandboxError) as e:
            return RunResult("error", None, "", "", detail=str(e))

    def _run(
        self,
        argv: list[str],
        entries: list[tuple[PurePosixPath, bytes]],
        stdin: bytes,
        limits: Limits,
        cgroup: RunCgroup,
    ) -> RunResult:
        fds: list[int] = []  # ours to close
        status_r, status_w = os.pipe()
        block_r, block_w = os.pipe()
        fds += [status_r, status_w, block_r, block_w]
        try:
            args = self._args(limits, entries, status_w, block_r, fds)
            passed = [fd for fd in fds if fd not in (status_r, block_w)]
            # As root, bwrap runs as a fresh unprivileged host user (see the module docstring).
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if self._own_uid else None
            start = time.monotonic()
            proc = subprocess.Popen(
                [*args, "--", *_rlimits(self._prlimit, limits), "/bin/sh", "-c", _INIT, "sh", *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd="/",
                env=_ENV,
                start_new_session=True,
                pass_fds=passed,
                user=uid,
                group=uid,
                extra_groups=[] if uid is not None else None,
            )
            for fd in passed:
                os.close(fd)
                fds.remove(fd)
            try:
                child = _child_pid(status_r, min(start + _SETUP_SECONDS, start + limits.wall_seconds + 5))
                if child is not None:  # blocked on --block-fd, before it execs: all it starts inherits
                    with contextlib.suppress(ProcessLookupError):  # gone: set-up failed, stderr says why
                        cgroup.attach(child)
            except BaseException:
                _kill_session(proc)
                raise
            with contextlib.suppress(BrokenPipeError):  # (unless bwrap already failed)
                os.write(block_w, b"go")  # bwrap's sandbox process, now confined, may run the command
            os.close(block_w)
            fds.remove(block_w)
            # On timeout, kill the sandbox's processes (its cgroup), not bwrap: bwrap then reaps its child and
            # exits by itself (killed first, it orphans the sandbox's pid 1: a zombie of the host's init).
            streams, timed_out = _communicate(
                proc, stdin, start + limits.wall_seconds, limits.max_output_bytes, on_timeout=cgroup.kill
            )
            wall = time.monotonic() - start
            report = _read_rest(status_r)
        finally:
            for fd in fds:
                os.close(fd)
        cgroup.kill()
        return _result(proc.returncode, report, streams, timed_out, wall, limits, cgroup)

    def _args(
        self,
        limits: Limits,
        entries: list[tuple[PurePosixPath, bytes]],
        status_w: int,
        block_r: int,
        fds: list[int],
    ) -> list[str]:
        """bwrap's command line (without the command); the files' memfds are appended to `fds`."""

        def data(content: bytes) -> str:
            fd = _memfd(content)
            fds.append(fd)
            return str(fd)

        args = [self._bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
        args += ["--unshare-cgroup-try"]
        if not limits.network:
            args.append("--unshare-net")
        if self._version >= (0, 8):
            args.append("--disable-userns")
        args += [
            "--as-pid-1",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            "sandbox",
        ]
        args += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
        args += ["--json-status-fd", str(status_w), "--block-fd", str(block_r)]
        args += ["--ro-bind", "/usr", "/usr"]
        for name in _TOP_LEVEL:
            path = "/" + name
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for path in self.ro_binds:
            args += ["--ro-bind", path, path]
        args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        if limits.network:
            for name in _NETWORK_ETC:
                args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        args += ["--perms", "0444", "--file", data(_PASSWD), "/etc/passwd"]
        args += ["--perms", "0444", "--file", data(_GROUP), "/etc/group"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        tmp = str(limits.tmp_mb << 20)
        args += ["--perms", "1777", "--size", tmp, "--tmpfs", "/dev/shm"]
        args += ["--perms", "1777", "--size", tmp, "--tmpfs", "/tmp", "--symlink", "../tmp", "/var/tmp"]
        args += ["--perms", "0755", "--size", str(limits.disk_mb << 20), "--tmpfs", WORKDIR]
        made: set[PurePosixPath] = set()
        for rel, content in entries:
            for parent in reversed(rel.parents[:-1]):  # "a/b/c.py": a, a/b
                if parent not in made:
                    made.add(parent)
                    args += ["--dir", f"{WORKDIR}/{parent}"]
            args += ["--perms", "0644", "--file", data(content), f"{WORKDIR}/{rel}"]
        args += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", WORKDIR]
        return args


def _memfd(content: bytes) -> int:
    """An anonymous in-memory file holding `content`, at offset 0 (bwrap copies it into the sandbox)."""
    fd = os.memfd_create("rlstack-sandbox-file", os.MFD_CLOEXEC)
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _readable(fd: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for `fd` to have data or EOF (poll: any fd number)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(timeout, 0.0) * 1000))


def _child_pid(status_r: int, deadline: float) -> int | None:
    """The host pid of bwrap's sandbox process, from the first line bwrap writes on --json-status-fd; None
    when bwrap ended before making it (its error is on stderr)."""
    line = b""
    while b"\n" not in line:
        if not _readable(status_r, deadline - time.monotonic()):
            raise SandboxError("bwrap did not start the sandbox in time")
        chunk = os.read(status_r, 4096)
        if not chunk:
            return None
        line += chunk
    match = re.search(rb'"child-pid"\s*:\s*(\d+)', line)
    return int(match.group(1)) if match else None


def _rlimits(prlimit: str, limits: Limits) -> list[str]:
    """The command's prefix that sets its rlimits inside the sandbox, then execs it (util-linux prlimit:
    setting them from outside needs CAP_SYS_RESOURCE over the sandbox's user, which root may lack)."""
    nofile, fsize, cpu = limits.open_files, limits.file_size_mb << 20, limits.cpu_limit
    return [
        prlimit,
        "--core=0:0",
        f"--nofile={nofile}:{nofile}",
        f"--fsize={fsize}:{fsize}",
        f"--cpu={cpu}:{cpu + 1}",  # SIGXCPU at the soft limit, SIGKILL a second later
        "--",
    ]


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    proc.wait()


def _read_rest(status_r: int) -> bytes:
    """What bwrap wrote on the status pipe after the first line (its exit-code report), once it exited."""
    data = b""
    while True:
        if not _readable(status_r, 1.0):
            return data
        chunk = os.read(status_r, 4096)
        if not chunk:
            return data
        data += chunk


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _result(
    returncode: int,
    report: bytes,
    streams: dict[str, tuple[bytes, int]],
    timed_out: bool,
    wall: float,
    limits: Limits,
    cgroup: RunCgroup,
) -> RunResult:
    cap = limits.max_output_bytes
    stdout = truncate(streams["stdout"][0], streams["stdout"][1], cap)
    stderr = truncate(streams["stderr"][0], streams["stderr"][1], cap)
    truncated = [name for name, (_, total) in streams.items() if total > cap]
    match = re.search(rb'"exit-code"\s*:\s*(\d+)', report)
    code = int(match.group(1)) if match else None
    oom = cgroup.oom_kills() > 0
    status: RunStatus
    detail = ""
    if timed_out:
        status, code, detail = "timeout", None, f"wall-clock limit of {limits.wall_seconds:g} s"
    elif code is None:  # the command never started: bwrap's set-up failed
        status, detail = "error", f"bwrap failed (exit {returncode}): {stderr.strip()[-800:]}"
        stdout = stderr = ""
    elif oom and code != 0:
        peak = cgroup.peak_memory()
        status, code = "oom", None
        detail = f"the run's memory limit of {limits.memory_mb} MiB" + (
            f", peak {peak / (1 << 20):.0f} MiB" if peak else ""
        )
    elif 128 < code <= 128 + 64:
        status, detail, code = "killed", _signal_name(code - 128), None
    else:
        status = "ok"
    return RunResult(status, code, stdout, stderr, wall, detail=detail, truncated=truncated)


def sandbox_processes() -> list[int]:
    """Live processes of this process's bubblewrap runs: bwrap itself (our child), or anything in a run
    cgroup that this process made. Empty between runs; for tests and leak hunting."""
    me, tag = os.getpid(), f"/{PREFIX}{os.getpid()}-"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                comm, _, rest = f.read().rpartition(")")
            with open(f"/proc/{entry}/cgroup") as f:
                in_run = tag in f.read()
        except OSError:
            continue  # gone meanwhile
        if in_run or (int(rest.split()[1]) == me and comm.endswith("(bwrap")):
            found.append(int(entry))
    return found


@cache
def _probe() -> str | None:
    """None when the bubblewrap backend runs here (one real run of a trivial Python), else why not."""
    found = _find_tools()
    if isinstance(found, str):
        return found
    missing = cgroups_unavailable()
    if missing:
        return f"{missing}; the bubblewrap sandbox needs them: run as root, or `rlstack sandbox setup`"
    python = _default_python()
    if python is None:
        return "no python3 under /usr (the bubblewrap sandbox runs the host's): apt-get install python3"
    result = BubblewrapSandbox().run([python, "-I", "-S", "-c", "pass"], limits=Limits(wall_seconds=30))
    if result.status == "error":
        if "namespace" in result.detail:
            return (
                f"bwrap cannot create namespaces here ({_userns_hint(result.detail)}): {result.detail[-300:]}"
            )
        return f"bwrap cannot run a sandbox here: {result.detail[-300:]}"
    if not result.succeeded:
        return f"a trivial run under bwrap failed ({result.describe()}): {result.stderr.strip()[-300:]}"
    return None
