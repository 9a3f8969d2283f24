"""Run directory safety: one writer (across processes, surviving SIGKILL), previous runs moved aside, and
checkpoints that a crash at any point leaves usable."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlstack import run_dir as rd
from rlstack.run_dir import (
    RUN_OUTPUTS,
    RunDirLock,
    RunDirLockedError,
    archive_previous_run,
    checkpoint_steps,
    clean_staging,
    latest_checkpoint,
    pause_point,
    prune_checkpoints,
    publish,
    staging_dir,
    write_latest,
)

ACQUIRE = "import sys; from pathlib import Path; from rlstack.run_dir import RunDirLock; "


def _python(code: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,  # type: ignore[call-overload]
    )


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_acquire_release(tmp_path: Path) -> None:
    run = tmp_path / "not" / "yet" / "there"
    with RunDirLock(run) as lock:
        assert lock.takeover is None
        record = json.loads((run / ".rlstack.lock").read_text())
        assert record["pid"] == os.getpid() and record["argv"] == sys.argv
        assert {"host", "started"} <= record.keys()
        with pytest.raises(RunDirLockedError, match=str(os.getpid())):
            RunDirLock(run).acquire()  # flock is per open file: a second lock in this process is refused too
    assert not (run / ".rlstack.lock").exists()
    lock.release()  # idempotent
    again = RunDirLock(run)
    assert again.acquire() is None
    again.release()


def test_release_between_open_and_flock_is_not_a_second_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder unlinks the lock file as it releases: a locker that opened the old file must not hold a
    lock on it alongside a third process holding the new file."""
    holder = RunDirLock(tmp_path)
    holder.acquire()
    real_flock, calls = fcntl.flock, list[int]()

    def flock(fd: int, operation: int) -> None:
        if not calls:
            holder.release()  # after our open, before our flock
        calls.append(fd)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    lock = RunDirLock(tmp_path)
    assert lock.acquire() is None and len(calls) == 2
    assert json.loads((tmp_path / ".rlstack.lock").read_text())["pid"] == os.getpid()
    with pytest.raises(RunDirLockedError):
        RunDirLock(tmp_path).acquire()
    lock.release()


def test_another_process_cannot_take_a_held_lock(tmp_path: Path) -> None:
    with RunDirLock(tmp_path):
        proc = _python(ACQUIRE + "RunDirLock(Path(sys.argv[1])).acquire(); print('acquired')", str(tmp_path))
        out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "acquired" not in out
    assert "RunDirLockedError" in err and f"pid {os.getpid()}" in err
    assert "two runs cannot write one directory" in err and str(tmp_path) in err


def test_stale_lock_record_is_reported_and_taken_over(tmp_path: Path) -> None:
    dead = _dead_pid()
    record = {"pid": dead, "host": "h", "started": "2024-01-01T00:00:00", "argv": ["rlstack", "train"]}
    (tmp_path / ".rlstack.lock").write_text(json.dumps(record))
    lock = RunDirLock(tmp_path)
    message = lock.acquire()
    assert message is not None and f"stale lock of pid {dead}" in message and "taking over" in message
    assert "rlstack train" in message and "2024-01-01T00:00:00" in message
    assert json.loads((tmp_path / ".rlstack.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_sigkilled_holder_leaves_the_lock_takeable(tmp_path: Path) -> None:
    code = ACQUIRE + "RunDirLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); input()"
    proc = _python(code, str(tmp_path), stdin=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLockedError, match=f"pid {proc.pid} "):
            RunDirLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    lock = RunDirLock(tmp_path)
    message = lock.acquire()
    assert message is not None and f"stale lock of pid {proc.pid} " in message
    lock.release()


def test_archive_moves_exactly_the_run_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert archive_previous_run(tmp_path) is None
    for name in ("metrics.jsonl", "config.resolved.yaml", "placement.json", "notes.txt"):
        (tmp_path / name).write_text(name)
    for name in ("samples", "tb", "checkpoints/step_1", "sft"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "sft" / "config.json").write_text("{}")
    lock = RunDirLock(tmp_path)
    lock.acquire()
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20240101-000000")  # both archives in one second

    first = archive_previous_run(tmp_path)
    assert first == tmp_path / "previous" / "20240101-000000"
    moved = {"metrics.jsonl", "config.resolved.yaml", "placement.json", "samples", "tb", "checkpoints"}
    assert {p.name for p in first.iterdir()} == moved
    assert (first / "checkpoints" / "step_1").is_dir() and (
        first / "metrics.jsonl"
    ).read_text() == "metrics.jsonl"
    assert {p.name for p in tmp_path.iterdir()} == {"notes.txt", "sft", "previous", ".rlstack.lock"}
    assert (tmp_path / "sft" / "config.json").exists()

    (tmp_path / "metrics.jsonl").write_text("second")
    second = archive_previous_run(tmp_path)
    assert second is not None and second != first and second.parent == first.parent
    assert [p.name for p in second.iterdir()] == ["metrics.jsonl"] and len(list(first.iterdir())) == 6
    assert set(RUN_OUTPUTS) >= moved
    lock.release()


def test_publish_replaces_an_existing_checkpoint(tmp_path: Path) -> None:
    final = tmp_path / "checkpoints" / "step_5"
    final.mkdir(parents=True)
    (final / "old.bin").write_text("old")
    staging = staging_dir(tmp_path, "step_5")
    assert staging.parent == final.parent and staging.name == f".staging-step_5-{os.getpid()}"
    (staging / "trainer_state").mkdir()
    (staging / "trainer_state" / "state.pt").write_text("new")
    (staging / "model.safetensors").write_text("new")
    publish(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "trainer_state"]
    assert [p.name for p in final.parent.iterdir()] == ["step_5"]  # no staging or replaced dirs left
    assert staging_dir(tmp_path, "step_5") == staging and not any(staging.iterdir())


def test_unpublished_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """A save killed between writing its staging dir and publishing: `latest` and step_3 are untouched."""
    ckpt = tmp_path / "checkpoints"
    staging = staging_dir(tmp_path, "step_3")
    (staging / "weights").write_text("3")
    publish(staging, ckpt / "step_3")
    write_latest(tmp_path, "step_3")
    flag = tmp_path / "paused"
    code = (
        "import sys; from pathlib import Path; from rlstack.run_dir import *; run = Path(sys.argv[1]); "
        "s = staging_dir(run, 'step_4'); (s / 'weights').write_text('4'); "
        "pause_point('checkpoint_save'); publish(s, run / 'checkpoints' / 'step_4')"
    )
    env = {**os.environ, "RLSTACK_TEST_PAUSE_AT": "checkpoint_save", "RLSTACK_TEST_PAUSE_FLAG": str(flag)}
    proc = _python(code, str(tmp_path), env=env)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert flag.exists(), proc.stderr.read() if proc.poll() is not None and proc.stderr else "timed out"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=60)

    assert latest_checkpoint(tmp_path) == ckpt / "step_3" and (ckpt / "step_3" / "weights").read_text() == "3"
    assert checkpoint_steps(tmp_path) == [3]
    leftover = ckpt / f".staging-step_4-{proc.pid}"
    assert (leftover / "weights").exists()
    assert clean_staging(tmp_path) == [leftover]
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_3"]
    assert clean_staging(tmp_path) == [] and clean_staging(tmp_path / "absent") == []


def test_clean_staging_restores_a_replaced_checkpoint_that_was_never_replaced(tmp_path: Path) -> None:
    """A crash between publish's two renames: the old step_7 sits under its `.replaced-` name; step_2 was
    replaced in full, so its old copy is deleted."""
    ckpt = tmp_path / "checkpoints"
    for name in ("step_2", ".replaced-step_2-11", ".replaced-step_7-12"):
        (ckpt / name).mkdir(parents=True)
        (ckpt / name / "weights").write_text(name)
    (ckpt / ".latest.abc").write_text("step_9")
    removed = clean_staging(tmp_path)
    assert {p.name for p in removed} == {".replaced-step_2-11", ".replaced-step_7-12", ".latest.abc"}
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_2", "step_7"]
    assert (ckpt / "step_7" / "weights").read_text() == ".replaced-step_7-12"
    assert (ckpt / "step_2" / "weights").read_text() == "step_2"


def test_write_latest_is_replaced_without_temp_files(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step_1").mkdir(parents=True)
    write_latest(tmp_path, "step_1")
    write_latest(tmp_path, "step_2")
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_1"]


def test_prune_keeps_newest_by_number_init_and_latest(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    for name in ("init", "step_1", "step_2", "step_9", "step_10", "step_11", "step_x", "step_03.bak"):
        (ckpt / name).mkdir(parents=True)
    (ckpt / "step_12").write_text("a file, not a checkpoint")
    write_latest(tmp_path, "step_1")
    assert checkpoint_steps(tmp_path) == [1, 2, 9, 10, 11]
    assert prune_checkpoints(tmp_path, keep_last=0) == []
    assert prune_checkpoints(tmp_path, keep_last=-1) == []
    # Newest two by N are 10 and 11 (lexically step_9 > step_11); step_1 is kept because latest names it.
    assert prune_checkpoints(tmp_path, keep_last=2) == [ckpt / "step_2", ckpt / "step_9"]
    remaining = {"init", "step_1", "step_10", "step_11", "step_x", "step_03.bak", "step_12", "latest"}
    assert {p.name for p in ckpt.iterdir()} == remaining
    assert prune_checkpoints(tmp_path, keep_last=2) == []
    assert prune_checkpoints(tmp_path / "absent", keep_last=1) == []


def test_pause_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag = tmp_path / "flag"
    monkeypatch.setenv("RLSTACK_TEST_PAUSE_FLAG", str(flag))
    monkeypatch.setenv("RLSTACK_TEST_PAUSE_S", "0.1")
    start = time.monotonic()
    pause_point("checkpoint_save")  # RLSTACK_TEST_PAUSE_AT unset
    monkeypatch.setenv("RLSTACK_TEST_PAUSE_AT", "checkpoint_save")
    pause_point("elsewhere")
    assert not flag.exists() and time.monotonic() - start < 0.05
    pause_point("checkpoint_save")
    assert flag.exists() and time.monotonic() - start >= 0.1


def test_module_imports_neither_torch_nor_ray() -> None:
    code = "import sys, rlstack.run_dir; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]" and rd.LOCK_FILE == ".rlstack.lock"
