"""Rollout actors clean up: no /dev/shm growth, no temp files, no processes left behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest
import ray

from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.group import RolloutGroup
from rlstack.rollout.worker import Prompt

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def _shm_bytes() -> int:
    return sum(e.stat().st_size for e in os.scandir("/dev/shm") if e.is_file(follow_symlinks=False))


def test_multiprocessing_engine_actor_leaves_nothing_behind(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The multiprocessing engine is the kind that leaked ~420 MB of /dev/shm per run when Ray killed it."""
    scratch = Path(tempfile.mkdtemp(prefix="rls-"))  # short: Ray's socket paths must stay < 108 chars
    (scratch / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch / "tmp"))  # inherited by Ray's workers and vLLM's processes
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    shm_before = _shm_bytes()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(scratch / "ray"))
    try:
        config = RolloutConfig(
            num_workers=1, multiprocessing=True, sampling=SamplingConfig(n=1, max_tokens=4)
        )
        group = RolloutGroup(tiny_checkpoint, config)
        assert len(group.generate([Prompt("a", text="<|user|>1+1<|assistant|>")])) == 1
        group.shutdown()
    finally:
        ray.shutdown()
    try:
        assert _shm_bytes() <= shm_before + (1 << 20), "/dev/shm grew"
        left = sorted(p.name for p in (scratch / "tmp").iterdir())
        assert left == [], f"temp files left behind: {left}"
        _, alive = psutil.wait_procs(
            [p for p in psutil.Process().children(recursive=True) if p.pid not in children_before], timeout=15
        )
        assert alive == [], f"processes left running: {[p.name() for p in alive]}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
