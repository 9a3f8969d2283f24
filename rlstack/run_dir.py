"""A run directory's safety: one writer at a time, previous runs moved aside, atomic checkpoints.

Guarantees (stdlib only; no torch, no Ray):
- Lock: one process at a time writes a run directory. `RunDirLock` holds `fcntl.flock` on `.rlstack.lock`
  for the run's lifetime; the kernel drops it when the process dies (SIGKILL and OOM included), so no lock
  outlives its run, and a record left by a dead holder is reported once and taken over.
- Archive: a fresh run in a used directory renames the previous run's outputs into
  `previous/<timestamp>/`; nothing is copied or deleted, and nothing else (`sft/`, the lock) is touched.
- Checkpoints: a crash at any instant leaves the previous checkpoint usable and never a half-written `step_N`
  or `latest`. A save writes into `checkpoints/.staging-<name>-<pid>`, `publish` fsyncs it and renames it
  into place, `write_latest` replaces `latest` by rename; a pruned step is renamed out of the way before it
  is deleted. `clean_staging` removes what a crashed save left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

CHECKPOINTS = "checkpoints"
"""Directory of a run's checkpoints; `latest` in it names the newest."""


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names, or None when the run has none."""
    marker = run_dir / CHECKPOINTS / "latest"
    if not marker.exists():
        return None
    return run_dir / CHECKPOINTS / marker.read_text().strip()


LOCK_FILE = ".rlstack.lock"
RUN_OUTPUTS: tuple[str, ...] = (
    "config.resolved.yaml",
    "metrics.jsonl",
    "expert_load.jsonl",
    "samples",
    "log_ratio.jsonl",
    "tb",
    "wandb",
    "mlruns",
    "sink_runs.json",
    "placement.json",
    "checkpoints",
)
"""What a run writes into its directory, and so what `archive_previous_run` moves aside."""

_STEP = re.compile(r"step_(\d+)")
_LEFTOVERS = (".staging-", ".replaced-", ".pruned-", ".latest.")


class RunDirLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


def _describe(record: dict[str, object]) -> str:
    """`pid N on HOST (started T, `COMMAND`)` from a lock record."""
    pid, host, started, argv = (record.get(k, "?") for k in ("pid", "host", "started", "argv"))
    command = shlex.join(map(str, argv)) if isinstance(argv, list) else "?"
    return f"pid {pid} on {host} (started {started}, `{command}`)"


class RunDirLock:
    """Exclusive lock on a run directory, held from `acquire` to `release` (or the `with` block's end)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.takeover: str | None = None
        """`acquire`'s stale-lock message, for callers using `with`."""
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock (creating the run directory if needed). Raises RunDirLockedError when a live process
        holds it; returns a one-line message to log when a dead holder's record was taken over, else None."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunDirLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.takeover = None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read_record(fd))
                os.close(fd)
                raise RunDirLockedError(
                    f"run dir {self.run_dir} is in use by {holder}: two runs cannot write one directory. "
                    "Wait for that run to end or stop it, or choose another trainer.run_dir."
                ) from None
            # A holder releasing between our open and our flock unlinked this file: lock the one now there.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read_record(fd)
        self._fd = fd
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        if previous and previous.get("pid") != os.getpid():
            self.takeover = (
                f"run dir {self.run_dir}: stale lock of {_describe(previous)} — that run died without "
                "releasing it; taking over"
            )
        return self.takeover

    def release(self) -> None:
        """Drop the lock and remove the lock file; does nothing when not held."""
        if self._fd is None:
            return
        # Unlink while still locked: a process that opened the old file sees it is gone and retries.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_record(fd: int) -> dict[str, object]:
    """The lock file's record: {} when empty, a placeholder when garbled (its writer died mid-write)."""
    data = os.pread(fd, 65536, 0)
    try:
        record = json.loads(data) if data.strip() else {}
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {"argv": ["<unreadable lock record>"]}


def archive_previous_run(run_dir: Path, outputs: tuple[str, ...] = RUN_OUTPUTS) -> Path | None:
    """Move (rename) the `outputs` that exist into a new `run_dir/previous/<YYYYmmdd-HHMMSS>[-k]/` and return
    it; None when none exist."""
    present = [name for name in outputs if os.path.lexists(run_dir / name)]
    if not present:
        return None
    base = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    base.parent.mkdir(parents=True, exist_ok=True)
    target, k = base, 0
    while True:
        try:
            target.mkdir()  # exclusive: two archives in one second get different directories
            break
        except FileExistsError:
            k += 1
            target = base.with_name(f"{base.name}-{k}")
    for name in present:
        (run_dir / name).rename(target / name)
    _fsync(run_dir)
    return target


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's (its entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(run_dir: Path, name: str) -> Path:
    """A fresh, empty `checkpoints/.staging-<name>-<pid>` to write checkpoint `name` into before `publish`."""
    path = run_dir / CHECKPOINTS / f".staging-{name}-{os.getpid()}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def publish(staging: Path, final: Path) -> None:
    """Make a fully written `staging` directory the checkpoint `final`: fsync its files and directories, then
    rename it into place. An existing `final` (a step redone after a restart) is replaced, then deleted."""
    for root, _, files in os.walk(staging):
        for file in files:
            path = Path(root) / file
            if path.is_file() and not path.is_symlink():
                _fsync(path)
        _fsync(Path(root))
    replaced = None
    if final.exists():
        replaced = final.with_name(f".replaced-{final.name}-{os.getpid()}")
        if replaced.exists():
            shutil.rmtree(replaced)
        final.rename(replaced)  # a crash here: clean_staging renames it back
    staging.rename(final)
    _fsync(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced)


def write_latest(run_dir: Path, name: str) -> None:
    """Point `checkpoints/latest` at `name`, atomically: readers see the old name or the new one."""
    directory = run_dir / CHECKPOINTS
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".latest.")  # clean_staging removes it after a crash
    with os.fdopen(fd, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / "latest")
    _fsync(directory)


def clean_staging(run_dir: Path) -> list[Path]:
    """Delete what crashed saves left in `checkpoints/` (staging, replaced and pruned directories, temporary
    `latest` files) and return it. A replaced checkpoint whose new version never landed is renamed back
    instead (and listed too). Call it holding the run's lock, before reading `latest`."""
    directory = run_dir / CHECKPOINTS
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        if not path.name.startswith(_LEFTOVERS):
            continue
        if path.name.startswith(".replaced-"):
            original = directory / path.name.removeprefix(".replaced-").rpartition("-")[0]
            if not os.path.lexists(original):
                path.rename(original)
                removed.append(path)
                continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The N of the published `checkpoints/step_N` directories, ascending."""
    directory = run_dir / CHECKPOINTS
    if not directory.is_dir():
        return []
    matches = (_STEP.fullmatch(p.name) for p in directory.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in matches if m)


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete the `step_N` directories older than the newest `keep_last` (by N; `keep_last <= 0` keeps all),
    never `init`, the one `latest` names, or anything else. Returns the deleted paths."""
    if keep_last <= 0:
        return []
    directory = run_dir / CHECKPOINTS
    marker = directory / "latest"
    latest = marker.read_text().strip() if marker.exists() else None
    deleted = []
    for n in checkpoint_steps(run_dir)[:-keep_last]:
        path = directory / f"step_{n}"
        if path.name == latest:
            continue
        # Renamed first so that a crash mid-delete never leaves a partial step_N.
        doomed = directory / f".pruned-{path.name}-{os.getpid()}"
        path.rename(doomed)
        shutil.rmtree(doomed)
        deleted.append(path)
    return deleted


def pause_point(name: str) -> None:
    """Test-only fault hook: when env RLSTACK_TEST_PAUSE_AT equals `name`, touch the file named by
    RLSTACK_TEST_PAUSE_FLAG (if set) and sleep RLSTACK_TEST_PAUSE_S seconds (default 3600), so that a test can
    SIGKILL the process at this exact point. Returns at once otherwise."""
    if os.environ.get("RLSTACK_TEST_PAUSE_AT") != name:
        return
    flag = os.environ.get("RLSTACK_TEST_PAUSE_FLAG")
    if flag:
        Path(flag).touch()
    time.sleep(float(os.environ.get("RLSTACK_TEST_PAUSE_S", "3600")))


def claim_run_dir(run_dir: Path) -> RunDirLock:
    """The run directory's lock, held until the caller releases it: a second run on the same directory
    fails here, naming the first; a lock a dead run left behind is logged and taken over."""
    lock = RunDirLock(run_dir)
    stale = lock.acquire()
    if stale is not None:
        logging.getLogger(__name__).warning("%s", stale)
    return lock
