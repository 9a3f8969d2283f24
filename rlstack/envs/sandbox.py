"""The sandbox interface: run an untrusted command on some files under limits, get back a `RunResult`.

A backend (`ProcessSandbox` now; Docker and bubblewrap later) implements `Sandbox.run`; callers pick one by
name with `get_sandbox` (`rlstack.envs.backends`), so a verifier never depends on how the isolation is
done. A command is written as it would run inside the sandbox: `python3` means the sandbox's Python
(for the process backend, an isolated interpreter that sees only the standard library).

    >>> from rlstack.envs import get_sandbox
    >>> result = get_sandbox("process").run(["python3", "-c", "print(input()[::-1])"], stdin="olleh")
    >>> result.stdout, result.exit_code, result.timed_out
    ('hello\\n', 0, False)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

Files = Mapping[str, str | bytes]


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up or run (not: the command failed)."""


@dataclass(frozen=True)
class Limits:
    """What one run may use. The process backend maps these onto rlimits and a wall-clock timer."""

    wall_seconds: float = 10.0
    """Wall-clock time; past it the whole sandbox (every process in it) is killed and `timed_out` is set."""
    cpu_seconds: float | None = None
    """CPU time per process (RLIMIT_CPU, rounded up to whole seconds); None: the wall-clock limit."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS), MiB."""
    max_output_bytes: int = 64 * 1024
    """Bytes of stdout and of stderr kept (each); the rest is read and dropped, and a marker says so."""
    file_size_mb: int = 16
    """Largest file a process may write (RLIMIT_FSIZE), MiB."""
    open_files: int = 64
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    max_processes: int = 32
    """Processes and threads the sandboxed user may have at once (RLIMIT_NPROC): a fork bomb stops here."""
    tmp_mb: int = 64
    """Size of the private /tmp, /var/tmp and /dev/shm where the backend provides them, MiB."""
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
        if self.tmp_mb < 1:
            raise ValueError(f"Limits.tmp_mb must be >= 1, got {self.tmp_mb}")

    @property
    def cpu_limit(self) -> int:
        """RLIMIT_CPU soft limit in whole seconds."""
        return max(1, math.ceil(self.cpu_seconds if self.cpu_seconds is not None else self.wall_seconds))


@dataclass
class RunResult:
    """How a sandboxed command ended, and what it printed (each stream cut at `Limits.max_output_bytes`)."""

    exit_code: int | None
    """The command's exit status; None when a signal ended it (see `killed_by`)."""
    stdout: str
    stderr: str
    timed_out: bool = False
    """The wall-clock limit was reached and the sandbox was killed."""
    killed_by: str | None = None
    """The signal that ended the command, e.g. "SIGKILL" (timeout, OOM), "SIGXCPU" (CPU limit)."""
    wall_seconds: float = 0.0
    truncated: list[str] = field(default_factory=list)
    """The streams that were cut ("stdout", "stderr")."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


def truncate(data: bytes, total: int, cap: int) -> str:
    """The first `cap` bytes as text, plus a marker when `total` bytes were written in all."""
    text = data[:cap].decode("utf-8", errors="replace")
    if total > cap:
        text += f"\n[... output truncated: {total} bytes in all, the first {cap} kept]\n"
    return text


class Sandbox(ABC):
    """Runs commands in isolation. Implementations: `ProcessSandbox` ("process")."""

    name: str = ""

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
        """Release what the backend holds (nothing for the process backend)."""
