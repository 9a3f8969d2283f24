"""`learner.dtype: bfloat16`: the rank holds its model in bf16, DeepSpeed ZeRO-2 on CPU (gloo, torch AdamW)
runs in its bf16 mode with fp32 master weights, a train step moves the weights, and log-probs stay fp32.

One rank in a spawned process: DeepSpeed caches its process groups per process (one worker per process)."""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.deepspeed


def _bf16_rank(model_path: str) -> dict[str, Any]:
    from learner_batches import ALGO, make_batch

    from rlstack.learner.config import LearnerConfig
    from rlstack.learner.worker import LearnerWorker, free_port

    cfg = LearnerConfig(backend="gloo", zero_stage=2, dtype="bfloat16", lr=1e-3, num_threads=1)
    worker = LearnerWorker(model_path, cfg, rank=0, world_size=1)
    worker.setup("127.0.0.1", free_port())
    try:
        engine = worker.engine
        before = {k: p.detach().clone() for k, p in engine.module.named_parameters()}
        batch = make_batch(8, seed=0)
        old = worker.compute_logprobs(batch)  # (B, L)
        metrics = worker.train_step(batch.replace(old_logp=old), ALGO)
        moved = [k for k, p in engine.module.named_parameters() if not torch.equal(before[k], p.detach())]
        return {
            "param_dtypes": {str(p.dtype) for p in engine.module.parameters()},
            "bf16_mode": bool(engine.bfloat16_enabled()),
            "master_dtypes": {str(t.dtype) for t in engine.optimizer.single_partition_of_fp32_groups},
            "logp_dtype": str(old.dtype),
            "logp_finite": bool(torch.isfinite(old).all()),
            "loss": metrics["actor/loss"],
            "moved": len(moved),
            "params": len(before),
        }
    finally:
        worker.shutdown()


def test_bf16_learner_rank_takes_a_train_step(tiny_checkpoint: Path) -> None:
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        out = pool.submit(_bf16_rank, str(tiny_checkpoint)).result(timeout=600)
    assert out["param_dtypes"] == {"torch.bfloat16"} and out["bf16_mode"]
    assert out["master_dtypes"] == {"torch.float32"}  # ZeRO-2 keeps fp32 master weights
    assert out["logp_dtype"] == "torch.float32" and out["logp_finite"]
    assert torch.isfinite(torch.tensor(out["loss"])) and out["moved"] == out["params"]
