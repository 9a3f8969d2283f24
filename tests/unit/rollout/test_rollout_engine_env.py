"""The environment an engine starts in: thread count (Ray actors default to 1 thread per reserved CPU), and
its private scratch dir (temp files inside it; one whose owner was killed is removed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import torch

from rlstack.rollout.engine import (
    OWNER_FILE,
    SCRATCH_PREFIX,
    EngineSettings,
    _engine_env,
    sweep_orphaned_scratch,
)


@pytest.fixture
def thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record torch.set_num_threads calls instead of making them: a vLLM-CPU engine started earlier in this
    process replaces that function with a no-op, so the thread count itself cannot be read back."""
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray gives an actor with num_cpus=1
    return calls


def test_num_threads_is_set_before_the_engine_starts(thread_calls: list[int]) -> None:
    with _engine_env(EngineSettings(num_threads=2)) as scratch:
        assert thread_calls == [2] and os.environ["OMP_NUM_THREADS"] == "2"
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and os.path.isdir(scratch)
    shutil.rmtree(scratch)


def test_no_num_threads_keeps_the_process_setting(thread_calls: list[int]) -> None:
    with _engine_env(EngineSettings()) as scratch:
        assert thread_calls == [] and os.environ["OMP_NUM_THREADS"] == "1"
    shutil.rmtree(scratch)


def test_temp_files_made_while_an_engine_starts_go_to_its_scratch_dir() -> None:
    """vLLM names its torch.distributed file store with `tempfile.gettempdir()`, cached at first use: it must
    land in the scratch dir that close_llm removes, not in /tmp."""
    before = tempfile.gettempdir()
    with _engine_env(EngineSettings()) as scratch:
        assert tempfile.gettempdir() == scratch and os.environ["TMPDIR"] == scratch
        owner = Path(scratch, OWNER_FILE).read_text().split()
        assert int(owner[0]) == os.getpid()
    assert tempfile.gettempdir() == before
    shutil.rmtree(scratch)


def test_scratch_dirs_of_dead_owners_are_swept_and_live_or_unclaimed_ones_kept(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    created = psutil.Process(child.pid).create_time()
    child.kill()
    child.wait()
    dead, live, unclaimed, other = (tmp_path / f"{SCRATCH_PREFIX}{n}" for n in ("dead", "live", "new", "x"))
    for d in (dead, live, unclaimed):
        d.mkdir()
    (dead / OWNER_FILE).write_text(f"{child.pid} {created}")
    me = psutil.Process()
    (live / OWNER_FILE).write_text(f"{me.pid} {me.create_time()}")
    other.with_name("not-ours").mkdir()
    assert sweep_orphaned_scratch(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and unclaimed.exists() and (tmp_path / "not-ours").exists()
