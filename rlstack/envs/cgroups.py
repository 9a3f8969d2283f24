"""Per-run cgroups: one memory and one pids cgroup per sandboxed run, so that a run's processes together are
capped, counted and killed as one (the bubblewrap backend's run-wide limits; bubblewrap makes no cgroups).

Both layouts are handled. cgroup v1 (separate `memory` and `pids` hierarchies, e.g. /sys/fs/cgroup/memory):
the run's cgroups are children of this process's own cgroup in each hierarchy; limits `memory.limit_in_bytes`
(and `memory.memsw.limit_in_bytes` where swap is accounted: no escape into swap), `pids.max`. cgroup v2 (one
unified hierarchy): one child of this process's cgroup with `memory.max`, `memory.swap.max = 0`,
`pids.max`; this needs the memory and pids controllers enabled for it, which the kernel refuses under a
cgroup that holds processes itself (other than the root): run inside a delegated cgroup then (e.g.
`systemd-run --user -p Delegate=yes --scope ...`).

    >>> with RunCgroup.create(memory_bytes=256 << 20, max_pids=33) as cgroup:  # doctest: +SKIP
    ...     cgroup.attach(pid)          # before it runs untrusted code: its descendants inherit the cgroup
    ...     ...                         # wait for the run
    ...     cgroup.kill()               # everything left in it, daemons included
    ...     oom = cgroup.oom_kills() > 0
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import signal
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType

PREFIX = "rlstack-"
"""Name prefix of every cgroup made here (for tests and leak hunting: `leftover_cgroups`)."""

_counter = itertools.count()


class CgroupError(RuntimeError):
    """A per-run cgroup could not be made, joined, emptied or removed."""


@dataclass(frozen=True)
class CgroupLayout:
    """Where this process's run cgroups go."""

    version: int
    """1: separate memory and pids hierarchies; 2: the unified hierarchy."""
    memory: Path
    """The parent of run cgroups in the memory hierarchy (v2: in the unified one)."""
    pids: Path
    """The parent in the pids hierarchy (v2: the same directory as `memory`)."""

    @property
    def parents(self) -> tuple[Path, ...]:
        return (self.memory,) if self.version == 2 else (self.memory, self.pids)


def _mounts() -> tuple[dict[str, tuple[str, Path]], tuple[str, Path] | None]:
    """cgroup v1 mounts by controller -> (mount root, mount point), and the cgroup2 mount, if any."""
    v1: dict[str, tuple[str, Path]] = {}
    v2 = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if "-" not in fields:
                continue
            sep = fields.index("-")
            root, point, fstype = fields[3], Path(fields[4]), fields[sep + 1]
            if fstype == "cgroup2" and v2 is None:
                v2 = (root, point)
            elif fstype == "cgroup":
                for option in fields[sep + 3].split(","):
                    v1.setdefault(option, (root, point))
    return v1, v2


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path by v1 controller ("memory", "pids") and "" for v2."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    return paths


def _inside(mount: tuple[str, Path], path: str) -> Path:
    """The directory of cgroup `path` under a mount of the hierarchy at mount root `mount[0]`."""
    root, point = mount
    rel = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
    if rel.startswith(".."):  # our cgroup is outside what is mounted (a cgroup namespace): its root
        return point
    return point / rel if rel not in ("", ".") else point


def layout() -> CgroupLayout:
    """Where this process's run cgroups go (v1 when memory and pids are v1 hierarchies, else v2); a
    CgroupError when neither has both controllers."""
    v1, v2 = _mounts()
    own = _own_cgroups()
    if "memory" in v1 and "pids" in v1:
        return CgroupLayout(
            1, _inside(v1["memory"], own.get("memory", "/")), _inside(v1["pids"], own.get("pids", "/"))
        )
    if v2 is not None:
        parent = _inside(v2, own.get("", "/"))
        available = set((parent / "cgroup.controllers").read_text().split())
        if {"memory", "pids"} <= available:
            return CgroupLayout(2, parent, parent)
        raise CgroupError(
            f"the memory and pids controllers are not available in cgroup v2 {parent} (not delegated to it; "
            f"it has: {' '.join(sorted(available)) or 'none'})"
        )
    raise CgroupError(
        "no cgroup hierarchy with the memory and pids controllers is mounted (looked for cgroup v1 "
        "memory and pids mounts, and cgroup2 in /proc/self/mountinfo)"
    )


def _write(path: Path, value: str | int) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _enable_v2_controllers(parent: Path) -> None:
    """Make memory and pids available to children of `parent` (cgroup.subtree_control)."""
    enabled = set((parent / "cgroup.subtree_control").read_text().split())
    missing = {"memory", "pids"} - enabled
    if not missing:
        return
    try:
        _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(missing)))
    except OSError as e:
        hint = (
            " (it holds processes itself: run inside a delegated cgroup, e.g. systemd-run --scope -p "
            "Delegate=yes)"
            if e.errno == errno.EBUSY
            else ""
        )
        raise CgroupError(
            f"cannot enable the memory and pids controllers under {parent}: {e.strerror}{hint}"
        ) from e


class RunCgroup:
    """The cgroup(s) of one run: made with limits, joined by the run's first process, then killed and
    removed. A context manager: leaving it kills what is left and removes the directories."""

    def __init__(self, where: CgroupLayout, name: str) -> None:
        self.layout, self.name = where, name
        self.dirs: tuple[Path, ...] = tuple(parent / name for parent in where.parents)

    @property
    def memory_dir(self) -> Path:
        return self.dirs[0]

    @property
    def pids_dir(self) -> Path:
        return self.dirs[-1]

    @classmethod
    def create(cls, memory_bytes: int, max_pids: int, where: CgroupLayout | None = None) -> RunCgroup:
        """New cgroup(s) for one run: all its processes together get `memory_bytes` of memory (no swap
        beyond it) and `max_pids` processes and threads."""
        where = where or layout()
        name = f"{PREFIX}{os.getpid()}-{next(_counter)}-{secrets.token_hex(3)}"
        cgroup = cls(where, name)
        made: list[Path] = []
        try:
            if where.version == 2:
                _enable_v2_controllers(where.memory)
            for path in cgroup.dirs:
                path.mkdir()
                made.append(path)
            cgroup._set_limits(memory_bytes, max_pids)
        except OSError as e:
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise CgroupError(f"cannot set up cgroup {cgroup.dirs[0]}: {e.strerror or e}") from e
        except CgroupError:
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        return cgroup

    def _set_limits(self, memory_bytes: int, max_pids: int) -> None:
        if self.layout.version == 1:
            _write(self.memory_dir / "memory.limit_in_bytes", memory_bytes)
            memsw = self.memory_dir / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # swap accounting on: memory + swap capped at the same size, so no swap
                _write(memsw, memory_bytes)
            with contextlib.suppress(OSError):  # not on every kernel; reclaim would only swap anyway
                _write(self.memory_dir / "memory.swappiness", 0)
        else:
            _write(self.memory_dir / "memory.max", memory_bytes)
            if (self.memory_dir / "memory.swap.max").exists():
                _write(self.memory_dir / "memory.swap.max", 0)
        _write(self.pids_dir / "pids.max", max_pids)

    def attach(self, pid: int) -> None:
        """Move process `pid` (not its existing children) into the cgroup(s); what it forks later is in
        them too. Raises ProcessLookupError when the process is gone."""
        for path in self.dirs:
            try:
                _write(path / "cgroup.procs", pid)
            except ProcessLookupError:
                raise
            except OSError as e:
                if e.errno == errno.ESRCH:
                    raise ProcessLookupError(pid) from e
                raise CgroupError(f"cannot move process {pid} into {path}: {e.strerror}") from e

    def pids(self) -> list[int]:
        """Processes in the cgroup now (as this process's pid namespace numbers them)."""
        found: set[int] = set()
        for path in self.dirs:
            with contextlib.suppress(FileNotFoundError):
                found.update(int(p) for p in (path / "cgroup.procs").read_text().split())
        return sorted(found)

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL everything in the cgroup until it is empty (forks are stopped first: pids.max 0)."""
        if not any(path.exists() for path in self.dirs):
            return
        with contextlib.suppress(OSError):
            _write(self.pids_dir / "pids.max", 0)
        kill_file = self.pids_dir / "cgroup.kill"
        if self.layout.version == 2 and kill_file.exists():
            with contextlib.suppress(OSError):
                _write(kill_file, 1)
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while pids := self.pids():
            for pid in pids:
                _kill_member(pid, self.name)
            if time.monotonic() > deadline:
                raise CgroupError(
                    f"processes {pids[:10]} in {self.pids_dir} survived SIGKILL for {timeout} s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer ended in this cgroup (its memory limit was reached)."""
        try:
            if self.layout.version == 1:
                text = (self.memory_dir / "memory.oom_control").read_text()
            else:
                text = (self.memory_dir / "memory.events").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def peak_memory(self) -> int | None:
        """Highest memory use of the run so far, bytes (None where the kernel does not say)."""
        name = "memory.max_usage_in_bytes" if self.layout.version == 1 else "memory.peak"
        try:
            return int((self.memory_dir / name).read_text())
        except (OSError, ValueError):
            return None

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left and remove the directories (retrying while the kernel still counts exiting
        processes)."""
        self.kill(timeout)
        deadline = time.monotonic() + timeout
        for path in self.dirs:
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(f"cannot remove cgroup {path}: {e.strerror}") from e
                    self.kill(timeout)
                    time.sleep(0.002)

    def __enter__(self) -> RunCgroup:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


def _kill_member(pid: int, name: str) -> None:
    """SIGKILL `pid` if it is (still) in cgroup `name`: through a pidfd, so a pid that was reused by an
    unrelated process meanwhile is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):  # gone, or a kernel without pidfds
        with contextlib.suppress(OSError):
            if f"/{name}" in Path(f"/proc/{pid}/cgroup").read_text():
                os.kill(pid, signal.SIGKILL)
        return
    try:
        # The pidfd pins the process it was opened for; /proc/PID now shows that one or a newer one
        # that got the number, and only a process of this cgroup passes the check.
        if f"/{name}" in Path(f"/proc/{pid}/cgroup").read_text():
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def leftover_cgroups(pid: int | None = None) -> list[Path]:
    """Run cgroups that process `pid` (default: this one) made and that still exist (empty between its
    runs; other processes' runs, e.g. a concurrent test session, are not counted)."""
    try:
        where = layout()
    except (CgroupError, OSError):
        return []
    pattern = f"{PREFIX}{os.getpid() if pid is None else pid}-*"
    return sorted(path for parent in where.parents for path in parent.glob(pattern))


@cache
def unavailable() -> str | None:
    """None when run cgroups can be made here; else why not (one sentence). Probed once per process."""
    try:
        where = layout()
    except (CgroupError, OSError) as e:
        return str(e)
    try:
        with RunCgroup.create(64 << 20, 8, where):
            pass
    except CgroupError as e:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        return f"cannot make per-run cgroups as {who} (cgroup v{where.version}): {e}"
    return None
