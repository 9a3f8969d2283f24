"""The sandbox interface: run an untrusted command on some files under limits, get back a `RunResult`.

A backend (Docker, bubblewrap, or the process fallback) implements `Sandbox.run`; callers pick one by
name with `get_sandbox` (`rlstack.envs.backends`), so a verifier never depends on how the isolation is
done. A command is written as it would run inside the sandbox: `python3` means the sandbox's Python
(for the process backend, an isolated interpreter that sees only the standard library).

    >>> from rlstack.envs import get_sandbox
    >>> result = get_sandbox("process").run(["python3", "-c", "print(input()[::-1])"], stdin="olleh")
    >>> result.stdout, result.status, result.exit_code
    ('hello\\n', 'ok', 0)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import ClassVar, Literal

Files = Mapping[str, str | bytes]


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up or run (not: the command failed)."""


@dataclass(frozen=True)
class Limits:
    """What one run may use. Docker and bubblewrap hold memory, processes and disk for the run as a whole
    (a cgroup, tmpfs sizes); the process backend can only set per-process rlimits (see each field)."""

    wall_seconds: float = 10.0
    """Wall-clock time; past it the whole sandbox (every process in it) is killed: status "timeout"."""
    cpu_seconds: float | None = None
    """CPU time per process (RLIMIT_CPU, rounded up to whole seconds); None: the wall-clock limit."""
    memory_mb: int = 512
    """Memory of the run, MiB: all its processes together in a cgroup (docker, bubblewrap); the process
    backend can only cap each process's address space (RLIMIT_AS)."""
    max_output_bytes: int = 64 * 1024
    """Bytes of stdout and of stderr kept (each); the rest is read and dropped, and a marker says so."""
    file_size_mb: int = 16
    """Largest file a process may write (RLIMIT_FSIZE), MiB."""
    open_files: int = 64
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    max_processes: int = 32
    """Processes and threads the run may have at once (a pids cgroup; the process backend: RLIMIT_NPROC of
    the sandbox's user): a fork bomb stops here."""
    tmp_mb: int = 64
    """Size of the private /tmp, /var/tmp and /dev/shm where the backend provides them, MiB."""
    disk_mb: int = 64
    """Size of the writable work directory, MiB (a tmpfs: docker, bubblewrap). The process backend works
    in a host directory and can only cap single files (`file_size_mb`)."""
    network: bool = False
    """Allow network access (by default a sandbox gets none where the backend can take it away)."""

    def __post_init__(self) -> None:
        for name in ("wall_seconds", "memory_mb", "max_output_bytes", "file_size_mb", "open_files"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"Limits.{name} must be a positive number, got {value!r}")
        if self.cpu_seconds is not None and not self.cpu_seconds > 0:
            raise ValueError(f"Limits.cpu_seconds must be > 0 or None, got {self.cpu_seconds!r}")
        if self.max_processes < 2:
            raise ValueError(
                f"Limits.max_processes must be >= 2 (the command and one child), got {self.max_processes}"
            )
        for name in ("tmp_mb", "disk_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def cpu_limit(self) -> int:
        """RLIMIT_CPU soft limit in whole seconds."""
        return max(1, math.ceil(self.cpu_seconds if self.cpu_seconds is not None else self.wall_seconds))


RunStatus = Literal["ok", "timeout", "oom", "killed", "error"]
"""How a sandboxed run ended, the same words for every backend (see `RunResult.status`)."""


@dataclass
class RunResult:
    """How a sandboxed command ended, and what it printed (each stream cut at `Limits.max_output_bytes`)."""

    status: RunStatus
    """- "ok": the command exited by itself; `exit_code` says how (0 or not).
    - "timeout": the wall-clock limit was reached and everything in the sandbox was killed.
    - "oom": the run's memory limit ended it (backends that cap a run's memory as a whole). Under the
      process backend's per-process address-space limit an allocation fails inside the program instead
      (Python raises MemoryError): "ok" with a non-zero exit code.
    - "killed": a signal ended it (`detail` names it, e.g. "SIGXCPU": the CPU-time limit).
    - "error": the sandbox could not run the command (`detail` says why). Not the command's fault: a
      verifier must not score it as a failure."""
    exit_code: int | None
    """The command's exit status when it exited ("ok"); else None."""
    stdout: str
    stderr: str
    wall_seconds: float = 0.0
    detail: str = ""
    """What ended a run that is not "ok": the signal's name, the limit hit, or the sandbox's error."""
    truncated: list[str] = field(default_factory=list)
    """The streams that were cut ("stdout", "stderr")."""

    @property
    def succeeded(self) -> bool:
        """The command exited by itself with status 0."""
        return self.status == "ok" and self.exit_code == 0

    def describe(self) -> str:
        """A few words for logs and sample records: "exit 3", "timeout after 10.0 s", "killed by SIGXCPU",
        "out of memory (...)", "sandbox error: ..."."""
        if self.status == "ok":
            return f"exit {self.exit_code}"
        if self.status == "timeout":
            return f"timeout after {self.wall_seconds:.1f} s"
        if self.status == "killed":
            return f"killed by {self.detail or 'a signal'}"
        if self.status == "oom":
            return f"out of memory ({self.detail})" if self.detail else "out of memory"
        return f"sandbox error: {self.detail}"


def check_command(command: Sequence[str]) -> list[str]:
    """`command` as an argv list; a ValueError unless it is a non-empty sequence of strings."""
    if isinstance(command, str) or not command or not all(isinstance(c, str) for c in command):
        raise ValueError(f"command must be a non-empty list of strings, got {command!r}")
    return list(command)


def checked_files(files: Mapping[str, str | bytes]) -> list[tuple[PurePosixPath, bytes]]:
    """A run's files as (path relative to the working directory, content), all checked before any is
    written: a ValueError names a file whose name is empty, absolute or has '..', or whose content is not
    str or bytes."""
    entries = []
    for name, content in files.items():
        rel = PurePosixPath(name)
        if not name or rel.is_absolute() or ".." in rel.parts or not isinstance(content, str | bytes):
            raise ValueError(
                f"sandbox file {name!r}: names must be relative paths inside the working directory "
                "(no '..') and contents str or bytes"
            )
        entries.append((rel, content.encode() if isinstance(content, str) else bytes(content)))
    return entries


def truncate(data: bytes, total: int, cap: int) -> str:
    """The first `cap` bytes as text, plus a marker when `total` bytes were written in all."""
    text = data[:cap].decode("utf-8", errors="replace")
    if total > cap:
        text += f"\n[... output truncated: {total} bytes in all, the first {cap} kept]\n"
    return text


class Sandbox(ABC):
    """Runs commands in isolation. Backends: `ProcessSandbox` ("process"), `DockerSandbox` ("docker"),
    `BubblewrapSandbox` ("bubblewrap"); `rlstack.envs.backends.get_sandbox` picks one by name or config."""

    name: ClassVar[str] = ""
    strict: ClassVar[bool] = False
    """The backend contains every case of the hostile suite (tests/unit/envs/test_hostile.py): no host
    file readable, no network, per-run memory / process / disk caps. `sandbox.strict` (the default)
    accepts only such backends; the process backend is not one (it cannot hide host files)."""

    @classmethod
    def unavailable(cls) -> str | None:
        """None when this backend can run on this host; else what is missing and how to get it (one
        sentence, e.g. "no Docker engine answers on /var/run/docker.sock: run `rlstack sandbox setup`")."""
        return None

    @abstractmethod
    def run(
        self,
        command: Sequence[str],
        files: Files | None = None,
        stdin: str | bytes = "",
        limits: Limits | None = None,
    ) -> RunResult:
        """Run `command` in a fresh working directory holding `files` (relative path -> content), with
        `stdin` (text goes UTF-8 encoded) as its standard input, under `limits` (default `Limits()`);
        everything it started is gone and the directory removed when this returns."""

    def close(self) -> None:  # noqa: B027  (optional: most backends hold nothing)
        """Release what the backend holds (a warm pool's containers, cgroups)."""
