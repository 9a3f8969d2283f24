"""`ProcessSandbox`: each run in a fresh temporary directory, as a child process tree under rlimits and, where
the kernel allows, in its own Linux namespaces. No Docker, no bubblewrap, no extra packages.

What a run gets (the strongest that `unshare` allows here, probed once per process and logged):
- a fresh working directory (also HOME and TMPDIR), removed afterwards; a minimal environment (PATH,
  HOME, TMPDIR, LANG: nothing inherited, so no tokens or keys); `python3` is an isolated interpreter
  (`-I -S`: no site-packages, so neither rlstack nor anything installed beside it can be imported);
- rlimits: CPU time, address space, file size, open files, processes (a fork bomb stops at
  `Limits.max_processes`), no core dumps;
- as root: its own uid (random, unprivileged, used by nothing else), so it cannot write root's files,
  signal or trace other processes, and the process cap is its own;
- namespaces, when `unshare` works (root, or unprivileged user namespaces): network (no interfaces but a
  downed loopback: no connections, not even to localhost), pid (it sees and can signal only its own
  processes; when the command ends, the kernel kills everything it left), mount (private tmpfs on /tmp,
  /var/tmp and /dev/shm, so the host's sockets there, e.g. Ray's, are out of sight and nothing it writes
  there outlives the run; its own /proc);
- on the wall-clock timeout, or when the command exits, every process it started is killed, including
  daemonised grandchildren in a new session (pid namespace, or else we are their subreaper).

What it does NOT isolate: the filesystem outside the working directory. The sandboxed code can read every
world-readable file (system files, this checkout, datasets), and write wherever its uid may. Not being
root, we cannot give it another uid: it then runs as our own user and can read and write whatever we can
(home directory, keys, checkouts) outside the private /tmp. It shares the host kernel (a kernel exploit
escapes it) and the machine's CPUs and memory bandwidth. Without namespaces (a container without
CAP_SYS_ADMIN, a kernel that forbids unprivileged user namespaces) it also has the network, sees host
processes and writes to the real /tmp (as root, what its uid left there is removed); a warning says so.
Use the Docker or bubblewrap backends (strict) where that matters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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

logger = logging.getLogger(__name__)

_LAUNCHER = (Path(__file__).with_name("_launcher.py")).read_text()
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_FLAGS = {"user": CLONE_NEWUSER, "mount": CLONE_NEWNS, "pid": CLONE_NEWPID, "net": CLONE_NEWNET}
_UID_BASE, _UID_SPAN = 0x7F000000, 0x00FFFFF0  # sandbox uids: far above any real user's
_GRACE_SECONDS = 2.0  # after SIGTERM to the launcher, before SIGKILL to its process group
_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
_CONFIGS = (("mount", "pid", "net"), ("pid", "net"), ())  # tried in this order
_WORKDIR_PREFIX = "rlstack-sandbox-"


@dataclass(frozen=True)
class Isolation:
    """What this machine lets the process backend do (probed once per interpreter)."""

    python: str
    """The interpreter behind `python3`."""
    namespaces: tuple[str, ...]
    """Linux namespaces each run gets: a subset of ("user", "mount", "pid", "net")."""
    own_uid: bool
    """Runs drop to a fresh unprivileged uid (only when we are root)."""
    note: str = ""
    """Why a stronger set-up was not available, if it was not."""

    @property
    def network_isolated(self) -> bool:
        return "net" in self.namespaces


_probed: dict[tuple[str | None, bool, tuple[str, ...]], Isolation] = {}
"""Probed set-ups by (python, running as root, namespaces allowed)."""
_probe_lock = threading.Lock()


def _python_candidates() -> list[str]:
    """The venv's base interpreter (same version as ours; never the venv itself, whose site-packages hold
    rlstack), then the system's. -S keeps site-packages out either way; as root, the interpreter must also
    be reachable by the sandbox uid (a pyenv under /root is not), which the probe checks."""
    found = []
    for path in (getattr(sys, "_base_executable", ""), "/usr/bin/python3", "/usr/local/bin/python3"):
        if path and os.path.isfile(path) and path not in found:
            found.append(path)
    return found


class ProcessSandbox(Sandbox):
    """Runs each command as a local process tree, isolated as far as the kernel allows (module docstring).

    python: the interpreter that `python3` in a command stands for (default: the first of the venv's base
    interpreter, /usr/bin/python3, /usr/local/bin/python3 that the sandbox can run). tmp_dir: where the
    working directories go (default: the system temp dir). namespaces: the Linux namespaces to use at most,
    of "mount", "pid", "net" (default: all that the kernel allows; a user namespace is added when not root).
    """

    name = "process"

    def __init__(
        self,
        python: str | None = None,
        tmp_dir: str | os.PathLike[str] | None = None,
        namespaces: Sequence[str] | None = None,
    ) -> None:
        if not sys.platform.startswith("linux"):
            raise SandboxError(
                f"the process sandbox needs Linux (rlimits, /proc, namespaces); this is {sys.platform}"
            )
        if namespaces is not None and (isinstance(namespaces, str) or set(namespaces) - set(_CONFIGS[0])):
            raise ValueError(f"namespaces must be a subset of {_CONFIGS[0]}, got {namespaces!r}")
        self._python = python
        self.tmp_dir = str(tmp_dir) if tmp_dir is not None else None
        self._own_uid = os.geteuid() == 0
        self._allowed = tuple(_CONFIGS[0]) if namespaces is None else tuple(namespaces)

    @property
    def isolation(self) -> Isolation:
        """The set-up each run gets; probed (a few tiny runs) on first use, then cached per process."""
        key = (self._python, self._own_uid, self._allowed)
        with _probe_lock:
            if key not in _probed:
                _probed[key] = self._probe()
            return _probed[key]

    def _configs(self) -> list[tuple[str, ...]]:
        """Namespace sets to try, strongest first."""
        configs: list[tuple[str, ...]] = []
        for config in _CONFIGS:
            allowed = tuple(n for n in config if n in self._allowed)
            if allowed and not self._own_uid:
                allowed = ("user", *allowed)  # unprivileged namespaces need a user namespace
            if allowed not in configs:
                configs.append(allowed)
        return configs

    def _probe(self) -> Isolation:
        pythons = [self._python] if self._python else _python_candidates()
        skipped = [n for n in _CONFIGS[0] if n not in self._allowed]
        problems: list[str] = []
        for python in pythons:
            failures = [f"not requested: {'+'.join(skipped)}"] if skipped else []
            for namespaces in self._configs():
                result = self._run(
                    [python, "-I", "-S", "-c", "pass"],
                    {},
                    "",
                    Limits(wall_seconds=30),
                    Isolation(python, namespaces, self._own_uid),
                )
                if result.status == "error":  # namespaces refused: try fewer
                    failures.append(f"{'+'.join(namespaces)}: {result.detail}")
                    continue
                if not result.succeeded:  # the interpreter itself does not run (e.g. not reachable)
                    problems.append(f"{python}: {result.describe()}, {result.stderr.strip()[-300:]}")
                    break
                note = "; ".join(failures)
                if "net" not in namespaces or "pid" not in namespaces:
                    logger.warning(
                        "process sandbox: running without network/pid namespaces (%s): sandboxed code has "
                        "the network, sees host processes and shares /tmp. Use a Docker or bubblewrap "
                        "sandbox where that matters.",
                        note,
                    )
                elif failures:
                    logger.info("process sandbox: namespaces %s (%s)", "+".join(namespaces), note)
                return Isolation(python, namespaces, self._own_uid, note)
            else:
                problems.append(f"{python}: {'; '.join(failures)}")
        raise SandboxError(
            "the process sandbox cannot run any Python: "
            + " | ".join(problems)
            + ". Pass python=/path/to/python3 (readable and executable by other users when running as root)"
        )

    # -- running ------------------------------------------------------------------------------------------

    def run(
        self,
        command: Sequence[str],
        files: Files | None = None,
        stdin: str | bytes = "",
        limits: Limits | None = None,
    ) -> RunResult:
        argv = check_command(command)
        iso = self.isolation
        if argv[0] in ("python3", "python"):
            argv = [iso.python, "-I", "-S", *argv[1:]]
        return self._run(argv, dict(files or {}), stdin, limits or Limits(), iso)

    def _run(
        self,
        argv: list[str],
        files: dict[str, str | bytes],
        stdin: str | bytes,
        limits: Limits,
        iso: Isolation,
    ) -> RunResult:
        namespaces = [n for n in iso.namespaces if not (n == "net" and limits.network)]
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if iso.own_uid else None
        # A root-owned directory around the one the sandbox owns: it cannot rename or replace its own.
        outer = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX, dir=self.tmp_dir))
        try:
            outer.chmod(0o711)
            workdir = outer / "work"
            workdir.mkdir()
            _write_files(workdir, files, uid)
            error_r, error_w = os.pipe()
            config = {
                "parent": os.getpid(),
                "error_fd": error_w,
                "uid": -1 if uid is None else uid,
                "unshare": sum(_FLAGS[n] for n in namespaces),
                "user_ns": int("user" in namespaces),
                "mount_ns": int("mount" in namespaces),
                "pid_ns": int("pid" in namespaces),
                "tmp_mb": limits.tmp_mb,
                "as": limits.memory_mb << 20,
                "cpu": limits.cpu_limit,
                "fsize": limits.file_size_mb << 20,
                "nofile": limits.open_files,
                "nproc": limits.max_processes,
            }
            env = {"PATH": _ENV_PATH, "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [iso.python, "-I", "-S", "-c", _LAUNCHER, _flat(config), str(workdir), *argv],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=workdir,
                    env=env,
                    start_new_session=True,
                    pass_fds=(error_w,),
                )
            except BaseException:
                os.close(error_r)
                raise
            finally:
                os.close(error_w)
            with os.fdopen(error_r, "rb") as errors:
                streams, timed_out = _communicate(
                    proc,
                    stdin.encode() if isinstance(stdin, str) else bytes(stdin),
                    start + limits.wall_seconds,
                    limits.max_output_bytes,
                )
                wall = time.monotonic() - start
                setup_error = errors.read().decode(errors="replace")
            if setup_error:
                return RunResult("error", None, "", "", wall, detail=f"sandbox set-up failed: {setup_error}")
        finally:
            _remove_tree(outer)
            if uid is not None and "mount" not in namespaces:
                _remove_owned_by(uid)
        cap = limits.max_output_bytes
        rc = proc.returncode
        status: RunStatus = "timeout" if timed_out else "killed" if rc < 0 else "ok"
        return RunResult(
            status=status,
            exit_code=rc if status == "ok" else None,
            stdout=truncate(streams["stdout"][0], streams["stdout"][1], cap),
            stderr=truncate(streams["stderr"][0], streams["stderr"][1], cap),
            wall_seconds=wall,
            detail=f"wall-clock limit of {limits.wall_seconds:g} s"
            if timed_out
            else signal.Signals(-rc).name
            if rc < 0
            else "",
            truncated=[name for name, (_, total) in streams.items() if total > cap],
        )


def _flat(config: dict[str, int]) -> str:
    """The launcher's config as `key=int,...` (it parses that without importing json)."""
    return ",".join(f"{key}={int(value)}" for key, value in config.items())


def _communicate(
    proc: subprocess.Popen[bytes],
    data: bytes,
    deadline: float,
    cap: int,
    on_timeout: Callable[[], None] | None = None,
) -> tuple[dict[str, tuple[bytes, int]], bool]:
    """Feed stdin, keep the first `cap` bytes of each output (counting the rest), until the sandbox ends or
    the deadline passes; then `on_timeout()` (default: SIGTERM the launcher, which kills the sandbox), and
    if the launcher has not exited a grace period later, SIGKILL its process group."""
    assert proc.stdin and proc.stdout and proc.stderr
    kept = {"stdout": bytearray(), "stderr": bytearray()}
    totals = {"stdout": 0, "stderr": 0}
    timed_out = False
    with selectors.DefaultSelector() as sel:
        if data:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        offset, killed_at = 0, None
        while sel.get_map():
            now = time.monotonic()
            if killed_at is None and now >= deadline:
                timed_out, killed_at = True, now
                if on_timeout is not None:
                    on_timeout()
                else:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
            if killed_at is not None and now >= killed_at + _GRACE_SECONDS:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                break
            wait = (deadline if killed_at is None else killed_at + _GRACE_SECONDS) - now
            for key, _ in sel.select(max(wait, 0.0)):
                if key.fileobj is proc.stdin:
                    try:
                        offset += os.write(proc.stdin.fileno(), data[offset : offset + 65536])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        offset = len(data)
                    if offset >= len(data):
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                name = key.data
                totals[name] += len(chunk)
                room = cap - len(kept[name])
                if room > 0:
                    kept[name] += chunk[:room]
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):
            stream.close()
    proc.wait()
    return {name: (bytes(kept[name]), totals[name]) for name in kept}, timed_out


def _write_files(workdir: Path, files: dict[str, str | bytes], uid: int | None) -> None:
    for rel, body in checked_files(files):
        path = workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    if uid is not None:  # the sandbox uid owns its working directory and may change what it was given
        for root, dirs, names in os.walk(workdir):
            for entry in (root, *(os.path.join(root, n) for n in dirs + names)):
                os.chown(entry, uid, uid)


def _remove_tree(path: Path) -> None:
    """rmtree, also of directories the sandbox made unreadable (chmod 000). Called once every sandboxed
    process is gone, so nothing changes under it; symbolic links are never followed."""
    if path.is_symlink() or not path.is_dir():
        return
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            inner = os.path.join(root, name)
            if not os.path.islink(inner):
                with contextlib.suppress(OSError):
                    os.chmod(inner, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _remove_owned_by(uid: int) -> None:
    """Without a private /tmp: remove what the sandbox uid left in the shared temp directories."""
    for base in ("/tmp", "/var/tmp", "/dev/shm"):
        with contextlib.suppress(OSError), os.scandir(base) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid == uid:
                        if entry.is_dir(follow_symlinks=False):
                            os.chmod(entry.path, 0o700)  # its own directory: not followed, not a link
                            _remove_tree(Path(entry.path))
                        else:
                            os.unlink(entry.path)


def sandbox_processes() -> list[int]:
    """Live (or unreaped) processes of process sandboxes: a sandbox uid, or a working directory or command
    line under a sandbox working directory. Empty between runs; for tests and leak hunting."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            cwd = ""
            with contextlib.suppress(OSError):
                cwd = os.readlink(f"/proc/{entry}/cwd")
        except (OSError, StopIteration):
            continue  # gone meanwhile
        ours = _WORKDIR_PREFIX in cwd or _WORKDIR_PREFIX.encode() in cmdline
        if _UID_BASE <= uid < _UID_BASE + _UID_SPAN or ours:
            found.append(int(entry))
    return found
