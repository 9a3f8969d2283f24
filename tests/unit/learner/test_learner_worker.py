"""The worker creates the default process group itself, without `device_id`, before DeepSpeed sees it.

DeepSpeed >= 0.17.3 passes `device_id` to `init_process_group` on CUDA; with it, the weight sync after the
first training step was reported to hang (allenai/open-instruct#1311). A group that already exists is
adopted by `deepspeed.init_distributed` as is. This runs the real set-up code up to that call (world 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from rlstack.learner.config import LearnerConfig
from rlstack.learner.worker import LearnerWorker, free_port


class _Stop(Exception):
    pass


def test_setup_owns_the_process_group_and_binds_no_device(monkeypatch, tiny_checkpoint: Path) -> None:
    import deepspeed

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(key, "restored-after-the-test")  # setup() writes these
    seen: dict = {}
    real_init = dist.init_process_group

    def spy_init(*args, **kwargs):
        seen["kwargs"] = kwargs
        return real_init(*args, **kwargs)

    def stop(*args, **kwargs):
        seen["initialized_first"] = dist.is_initialized()
        seen["bound_device_id"] = dist.distributed_c10d._get_default_group().bound_device_id
        raise _Stop

    monkeypatch.setattr(dist, "init_process_group", spy_init)
    monkeypatch.setattr(deepspeed, "init_distributed", stop)
    worker = LearnerWorker(str(tiny_checkpoint), LearnerConfig(backend="gloo"), rank=0, world_size=1)
    try:
        with pytest.raises(_Stop):
            worker.setup("127.0.0.1", free_port())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert "device_id" not in seen["kwargs"]
    assert seen["initialized_first"] and seen["bound_device_id"] is None


def test_load_checkpoint_refuses_other_layouts_before_touching_the_engine(tmp_path: Path) -> None:
    worker = LearnerWorker(str(tmp_path), LearnerConfig(zero_stage=2), rank=0, world_size=2)
    with pytest.raises(FileNotFoundError, match="not a learner checkpoint"):
        worker.load_checkpoint(str(tmp_path))
    state = tmp_path / "trainer_state"
    state.mkdir()
    meta = {"version": 3, "tag": "version_3", "world_size": 4, "zero_stage": 3}
    (state / "learner.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="saved with 4 ranks and ZeRO-3, but this learner has 2 ranks"):
        worker.load_checkpoint(str(tmp_path))
