"""`DockerSandbox`: each run in a fresh Docker container, through the docker SDK, in the image that
`rlstack sandbox build-image` makes (rlstack.envs.image: minimal Debian with Python, no registry needed).

What a run gets:
- its own container, for this run only, removed before `run` returns (also on errors and interrupts). A
  warm pool keeps a few started and idle, each serving one run. All carry the label `rlstack.sandbox`:
  at exit a process removes its own, and a new sandbox removes those whose owner process is gone;
- its own filesystem: the image, read-only; a tmpfs work directory /work (`Limits.disk_mb`, also HOME)
  holding the run's files; tmpfs /tmp, /var/tmp and /dev/shm (`Limits.tmp_mb`). None of the host's files
  is visible, and nothing written outlives the run;
- no network (`network_mode=none`: a loopback of its own only) unless `Limits.network`;
- its own pid, IPC, UTS and mount namespaces; an unprivileged user (65534, every capability dropped,
  no-new-privileges: setuid binaries give nothing); an environment of PATH, HOME and LANG only;
- a cgroup for the whole run: memory (`Limits.memory_mb`, no swap; tmpfs contents count too), processes
  (`Limits.max_processes`, plus 3 of the container's own: docker-init, its idle child, the wrapper shell),
  one CPU; per-process rlimits: CPU time, file size, open files, no core dumps;
- on the wall-clock timeout the container is killed (status "timeout"); when the command exits, every
  process it left behind is killed. A run that the kernel's OOM killer touched and that did not exit 0 is
  "oom" (read from the container's memory cgroup; where this process cannot see the engine's cgroups, it
  shows as killed by SIGKILL instead).

How the files get in: the run's process is `sh -c WRAPPER`, exec'd in the container as the run's user; its
stdin is a tar of the files followed by the caller's stdin. The wrapper unpacks exactly the tar's length
(`head -c`) into /work, sets the rlimits, says it is ready on stderr (a marker the host strips), then runs
the command, which reads the rest of stdin. (A read-only container takes no `put_archive`, and one into a
tmpfs would land under it.) So every run, warm or cold, is one exec into a started container.

What it does NOT isolate: it shares the host kernel (a kernel exploit escapes it; the syscall filter is
Docker's default seccomp profile, no stricter; no AppArmor/SELinux profile unless the host has one); the
uid is not remapped (65534 is the host's `nobody`: harmless only because nothing of the host is mounted);
the CPU cap is a quota, not a reservation, and memory bandwidth, caches and disk I/O are shared; anyone who
can reach the Docker socket controls the engine (the sandboxed code cannot: it is not mounted). An exit
status above 128 is read as death by signal n-128 (the shell's convention), so a program that exits 137
by itself is reported as killed by SIGKILL.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlstack.envs.docker_exec import READY, close_exec, exchange, tar_files
from rlstack.envs.image import ENV_PATH, default_image, docker_client, image_present
from rlstack.envs.sandbox import (
    Files,
    Limits,
    RunResult,
    RunStatus,
    Sandbox,
    SandboxError,
    check_command,
    truncate,
)

logger = logging.getLogger(__name__)

LABEL = "rlstack.sandbox"
"""Every container a DockerSandbox makes carries this label ("1")."""
OWNER_LABEL = "rlstack.sandbox.owner"
"""... and this one: the process that made it (`_owner()`: host, boot, pid namespace, pid, start time) ..."""
INSTANCE_LABEL = "rlstack.sandbox.instance"
"""... and this one: the `DockerSandbox.instance` that made it."""
RUN_USER = "65534:65534"
IDLE_USER = "65533:65533"  # PID 1's child; another uid, so the run cannot signal it
WORKDIR = "/work"
_EXTRA_PIDS = 3  # docker-init, the idle `sleep` and the wrapper shell, besides the run's own processes
_ENV = {"PATH": ENV_PATH, "HOME": WORKDIR, "LANG": "C.UTF-8"}
_SETUP_FAILED = 125
# $1: tar bytes on stdin; $2: CPU seconds; $3: file size, 512-byte blocks; $4: open files; then the command.
_WRAPPER = f"""n=$1 cpu=$2 fsize=$3 nofile=$4; shift 4
if [ "$n" -gt 0 ]; then head -c "$n" | tar -xf - -C {WORKDIR} || exit {_SETUP_FAILED}; fi
ulimit -c 0 && ulimit -S -t "$cpu" && ulimit -H -t $((cpu + 1)) && ulimit -f "$fsize" \\
  && ulimit -n "$nofile" || exit {_SETUP_FAILED}
unset HOSTNAME PWD OLDPWD
printf '{READY.decode().strip()}\\n' >&2
"$@"
rc=$?
kill -9 -1 2>/dev/null
exit $rc
"""


def _no_engine(error: Exception) -> str:
    """Why no engine answers, in a few words, and what to do."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    text = str(error)
    if "PermissionError" in text or "Permission denied" in text:
        return f"no permission to use the Docker engine at {host}: run as root or join the docker group"
    reason = (
        "no such socket" if "FileNotFoundError" in text else "connection refused" if "efused" in text else ""
    )
    reason = reason or type(error).__name__
    return f"no Docker engine answers at {host} ({reason}): run `rlstack sandbox setup` (as root)"


def _owner() -> str:
    """This process, unambiguously: "<host>:<boot id>:<pid namespace>:<pid>:<start time>"."""
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    namespace = ""
    with contextlib.suppress(OSError):
        namespace = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    pid = os.getpid()
    return f"{socket.gethostname()}:{boot}:{namespace}:{pid}:{_start_time(pid)}"


class _NotRunning(Exception):
    """The container to exec in is gone or stopped."""


@dataclass(frozen=True)
class _Container:
    id: str
    oom_file: Path | None
    """The cgroup file whose `oom_kill` count says whether the kernel OOM-killed anything in it."""


ContainerKey = tuple[int, int, int, int, bool]
"""What a container is created with, and so what a warm one must match: memory_mb, max_processes,
disk_mb, tmp_mb, network. (The rlimits and the wall-clock limit are per run.)"""


def _key(limits: Limits) -> ContainerKey:
    return (limits.memory_mb, limits.max_processes, limits.disk_mb, limits.tmp_mb, limits.network)


class DockerSandbox(Sandbox):
    """Runs each command in a fresh container (module docstring). image: the Docker image (default: the
    one `rlstack sandbox build-image` makes, `rlstack.envs.image.default_image()`); warm_pool: containers
    kept started and idle for the next runs (0: each run starts its own). Thread-safe."""

    name = "docker"
    strict = True

    def __init__(self, image: str | None = None, warm_pool: int = 2) -> None:
        if warm_pool < 0:
            raise ValueError(f"warm_pool must be >= 0, got {warm_pool}")
        import docker.errors

        self.image = image or default_image()
        try:
            self._client = docker_client(max_pool_size=64)  # one connection per concurrent run
        except docker.errors.DockerException as e:
            raise SandboxError(_no_engine(e)) from e
        self._api = self._client.api
        if not image_present(self.image, self._client):
            self._client.close()
            hint = "run `rlstack sandbox build-image`" if image is None else "build or load it first"
            raise SandboxError(f"the Docker image {self.image} is missing: {hint}")
        self.instance = uuid.uuid4().hex[:16]
        """This sandbox's containers carry it (INSTANCE_LABEL)."""
        self._labels = {LABEL: "1", OWNER_LABEL: _owner(), INSTANCE_LABEL: self.instance}
        self._lock = threading.Lock()
        self._live: set[str] = set()
        self._closed = False
        remove_leftovers(self._client)
        _made_any.set()
        self._pool = _Pool(self, warm_pool)
        _open_sandboxes.add(self)

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import docker
        except ImportError:
            return "the docker Python SDK is not installed: pip install docker (an rlstack dependency)"
        try:
            client = docker.from_env(timeout=10)
            client.ping()
        except docker.errors.DockerException as e:
            return _no_engine(e)
        try:
            if not image_present(default_image(), client):
                return f"the sandbox image {default_image()} is missing: run `rlstack sandbox build-image`"
        except docker.errors.DockerException as e:
            return _no_engine(e)
        finally:
            client.close()
        return None

    # -- running ------------------------------------------------------------------------------------------

    def run(
        self,
        command: Sequence[str],
        files: Files | None = None,
        stdin: str | bytes = "",
        limits: Limits | None = None,
    ) -> RunResult:
        argv = check_command(command)
        if self._closed:
            raise SandboxError("this DockerSandbox is closed")
        limits = limits or Limits()
        archive = tar_files(dict(files or {}))
        data = archive + (stdin.encode() if isinstance(stdin, str) else bytes(stdin))
        import docker.errors

        container = self._pool.take(_key(limits))
        warm = container is not None
        try:
            if container is None:
                container = self._start_container(_key(limits))
            try:
                return self._exec(container, argv, data, len(archive), limits)
            except _NotRunning:
                if not warm:
                    raise
            self._remove(container.id)  # a warm container that died meanwhile (an engine restart): go cold
            container = None
            container = self._start_container(_key(limits))
            return self._exec(container, argv, data, len(archive), limits)
        except (docker.errors.DockerException, _NotRunning) as e:
            return RunResult("error", None, "", "", detail=f"Docker: {e}")
        finally:
            if container is not None:
                self._remove(container.id)

    def _exec(
        self, container: _Container, command: list[str], data: bytes, archive_size: int, limits: Limits
    ) -> RunResult:
        import docker.errors

        api = self._api
        argv = ["sh", "-c", _WRAPPER, "sh", str(archive_size), str(limits.cpu_limit)]
        argv += [str(limits.file_size_mb * 2048), str(limits.open_files), *command]
        try:
            exec_id = api.exec_create(
                container.id, argv, stdin=True, stdout=True, stderr=True, user=RUN_USER, workdir=WORKDIR
            )["Id"]
        except docker.errors.APIError as e:
            if e.status_code in (404, 409):  # gone, or not running
                raise _NotRunning(str(e)) from e
            raise
        start = time.monotonic()
        conn = api.exec_start(exec_id, socket=True)
        try:
            streams, timed_out = exchange(conn, data, start + limits.wall_seconds, limits.max_output_bytes)
        finally:
            close_exec(conn)
        wall = time.monotonic() - start
        cap = limits.max_output_bytes
        (out, out_total), (err, err_total), ready = streams["stdout"], streams["stderr"], streams["ready"]
        if timed_out:
            with contextlib.suppress(Exception):
                api.kill(container.id)
            status: RunStatus = "timeout"
            exit_code, detail = None, f"wall-clock limit of {limits.wall_seconds:g} s"
        else:
            exit_code = self._exit_code(exec_id)
            if ready != READY:
                message = (ready + err).decode(errors="replace").strip()[-2000:]
                return RunResult("error", None, "", "", wall, detail=f"sandbox set-up failed: {message}")
            if exit_code is None:
                return RunResult("error", None, "", "", wall, detail="the run's exit status is unknown")
            status, detail = "ok", ""
            oom_kills = self._oom_kills(container, exit_code) if exit_code else 0
            if oom_kills and exit_code != 0:
                status, detail = (
                    "oom",
                    f"memory limit of {limits.memory_mb} MiB, {oom_kills} process(es) killed",
                )
            elif exit_code > 128 and exit_code - 128 in signal.valid_signals():
                status, detail = "killed", signal.Signals(exit_code - 128).name
            if status != "ok":
                exit_code = None
        return RunResult(
            status=status,
            exit_code=exit_code,
            stdout=truncate(out, out_total, cap),
            stderr=truncate(err, err_total, cap),
            wall_seconds=wall,
            detail=detail,
            truncated=[name for name, total in (("stdout", out_total), ("stderr", err_total)) if total > cap],
        )

    def _exit_code(self, exec_id: str) -> int | None:
        """The exec's exit status (it may be reported a moment after its output closes)."""
        for _ in range(200):
            info = self._api.exec_inspect(exec_id)
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"])
            time.sleep(0.01)
        return None

    def _oom_kills(self, container: _Container, exit_code: int) -> int:
        """Processes the kernel OOM-killed in the container: its cgroup's count, else (an engine whose
        cgroups we cannot see) Docker's flag, which follows the kernel's event a moment later."""
        if container.oom_file is not None:
            with contextlib.suppress(OSError, ValueError):
                for line in container.oom_file.read_text().splitlines():
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        for _ in range(10 if exit_code == 128 + signal.SIGKILL else 1):
            if self._api.inspect_container(container.id)["State"].get("OOMKilled"):
                return 1
            time.sleep(0.05)
        return 0

    # -- containers ---------------------------------------------------------------------------------------

    def _start_container(self, key: ContainerKey) -> _Container:
        """Create and start an idle container (PID 1: docker-init, running `sleep infinity`)."""
        from docker.types import LogConfig, Ulimit

        memory_mb, max_processes, disk_mb, tmp_mb, network = key
        tmpfs_options = "rw,exec,nosuid,nodev,mode=1777,size={}m"
        run_uid, run_gid = RUN_USER.split(":")
        api = self._api
        host_config = api.create_host_config(
            network_mode=None if network else "none",
            read_only=True,
            tmpfs={
                WORKDIR: tmpfs_options.format(disk_mb) + f",uid={run_uid},gid={run_gid}",
                "/tmp": tmpfs_options.format(tmp_mb),
                "/var/tmp": tmpfs_options.format(tmp_mb),
            },
            shm_size=f"{tmp_mb}m",
            mem_limit=f"{memory_mb}m",
            memswap_limit=f"{memory_mb}m",
            pids_limit=max_processes + _EXTRA_PIDS,
            nano_cpus=10**9,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            ulimits=[Ulimit(name="core", soft=0, hard=0)],
            init=True,
            log_config=LogConfig(type="none"),
        )
        created = api.create_container(
            self.image,
            command=["sleep", "infinity"],
            user=IDLE_USER,  # no working_dir: Docker would make the tmpfs /work root's, mode 755
            environment=_ENV,
            labels=self._labels,
            host_config=host_config,
            hostname="sandbox",
            network_disabled=not network,
            use_config_proxy=False,
        )
        cid = created["Id"]
        with self._lock:
            self._live.add(cid)
        try:
            api.start(cid)
            pid = api.inspect_container(cid)["State"]["Pid"]
        except BaseException:
            self._remove(cid)
            raise
        return _Container(cid, _oom_file(pid, cid))

    def _remove(self, cid: str) -> None:
        import docker.errors

        try:
            self._api.remove_container(cid, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if "already in progress" not in str(e):
                logger.warning("docker sandbox: could not remove container %s: %s", cid[:12], e)
                return
        with self._lock:
            self._live.discard(cid)

    def close(self) -> None:
        """Remove the warm pool's containers and any run's still live; later runs are refused."""
        self._closed = True
        self._pool.close()
        with self._lock:
            live = list(self._live)
        for cid in live:
            self._remove(cid)
        _open_sandboxes.discard(self)
        self._client.close()

    def __enter__(self) -> DockerSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Pool:
    """Up to `size` started, idle containers of the last key asked for, refilled by a background thread.
    A run takes one (or starts its own when none is ready or the key differs); none serves two runs."""

    def __init__(self, sandbox: DockerSandbox, size: int) -> None:
        self._sandbox = weakref.proxy(sandbox)
        self._size = size
        self._cond = threading.Condition()
        self._ready: deque[_Container] = deque()
        self._stale: list[_Container] = []
        self._key: ContainerKey | None = _key(Limits()) if size else None
        self._closed = False
        self._thread: threading.Thread | None = None
        if size:
            self._thread = threading.Thread(target=self._fill, name="docker-sandbox-pool", daemon=True)
            self._thread.start()

    def take(self, key: ContainerKey) -> _Container | None:
        if not self._size:
            return None
        with self._cond:
            if key != self._key:  # new limits: the pool now makes containers for them
                self._stale += self._ready
                self._ready.clear()
                self._key = key
                self._cond.notify_all()
                return None
            container = self._ready.popleft() if self._ready else None
            self._cond.notify_all()
            return container

    def _fill(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._closed and not self._stale and len(self._ready) >= self._size:
                    self._cond.wait()
                if self._closed:
                    return
                stale, self._stale = self._stale, []
                key = self._key
            try:
                for old in stale:
                    self._sandbox._remove(old.id)
                if stale or key is None:
                    continue
                container = self._sandbox._start_container(key)
            except ReferenceError:  # the sandbox is gone
                return
            except Exception as e:
                failures += 1
                logger.warning("docker sandbox: could not start a warm container (%s); retrying", e)
                with self._cond:  # a back-off that close() cuts short
                    if not self._closed:
                        self._cond.wait(min(30.0, 0.5 * 2**failures))
                continue
            failures = 0
            with self._cond:
                if not self._closed and key == self._key:
                    self._ready.append(container)
                    continue
            with contextlib.suppress(ReferenceError):
                self._sandbox._remove(container.id)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle = [*self._ready, *self._stale]
            self._ready.clear()
            self._stale = []
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        for container in idle:
            with contextlib.suppress(ReferenceError):
                self._sandbox._remove(container.id)


# -- helpers ------------------------------------------------------------------------------------------------


def _oom_file(pid: int, cid: str) -> Path | None:
    """The memory cgroup file of container `cid`'s PID 1 (`pid`, as the engine sees it) that counts OOM
    kills, if readable here (we see the engine's processes and cgroups: the path names the container)."""
    root = Path("/sys/fs/cgroup")
    for candidate in (  # Docker's cgroupfs and systemd drivers, cgroup v1 and v2
        root / "memory/docker" / cid / "memory.oom_control",
        root / f"memory/system.slice/docker-{cid}.scope/memory.oom_control",
        root / "docker" / cid / "memory.events",
        root / f"system.slice/docker-{cid}.scope/memory.events",
    ):
        if candidate.is_file():
            return candidate
    with contextlib.suppress(OSError, ValueError):  # a cgroup parent of its own: where PID 1 is
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if cid not in path:
                continue
            if "memory" in controllers.split(","):
                candidate = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.oom_control"
            elif controllers == "":
                candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events"
            else:
                continue
            if candidate.is_file():
                return candidate
    return None


def sandbox_containers(
    client: Any = None, owner: str | None = None, instance: str | None = None
) -> list[dict[str, Any]]:
    """The containers (any state) that DockerSandboxes made: all, one process's (its OWNER_LABEL), or one
    sandbox's (`DockerSandbox.instance`)."""
    own = client is None
    client = client or docker_client()
    labels = [f"{LABEL}=1"]
    if owner:
        labels.append(f"{OWNER_LABEL}={owner}")
    if instance:
        labels.append(f"{INSTANCE_LABEL}={instance}")
    try:
        found: list[dict[str, Any]] = client.api.containers(all=True, filters={"label": labels})
        return found
    finally:
        if own:
            client.close()


def remove_leftovers(client: Any = None, everything: bool = False) -> int:
    """Remove the sandbox containers whose owner process is gone (or, with `everything`, all of them, also
    live processes' and other machines'); returns how many. Only owners this process can see are judged: a
    container of another machine or pid namespace (another container, another session) is left alone."""
    own = client is None
    client = client or docker_client()
    scope, _, _ = _owner().rpartition(":")
    scope = scope.rpartition(":")[0]  # host:boot:pidns
    removed = 0
    try:
        for info in sandbox_containers(client):
            owner = str((info.get("Labels") or {}).get(OWNER_LABEL, ""))
            owner_scope, pid, start = [*owner.rsplit(":", 2), "", ""][:3]
            if not everything and (
                owner_scope != scope or not pid.isdigit() or _start_time(int(pid)) == start
            ):
                continue
            with contextlib.suppress(Exception):
                client.api.remove_container(info["Id"], force=True)
                removed += 1
    finally:
        if own:
            client.close()
    return removed


def _start_time(pid: int) -> str:
    """When process `pid` started (clock ticks since boot), "" if there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


_open_sandboxes: weakref.WeakSet[DockerSandbox] = weakref.WeakSet()
_made_any = threading.Event()  # this process made a DockerSandbox: clean up its containers at exit


@atexit.register
def _close_all() -> None:
    """At exit: close the sandboxes still open, then remove anything else labelled as this process's."""
    for sandbox in list(_open_sandboxes):
        with contextlib.suppress(Exception):
            sandbox.close()
    if _made_any.is_set():
        with contextlib.suppress(Exception):
            client = docker_client()
            for info in sandbox_containers(client, owner=_owner()):
                with contextlib.suppress(Exception):
                    client.api.remove_container(info["Id"], force=True)
            client.close()
