"""Broadcast weight sync in training: with `rollout.weight_sync` 'gloo' (CPU) or 'nccl' (GPUs) the learner's
rank 0 pushes its weights straight into the vLLM engines (no driver hop), and vLLM then serves exactly the
learner's policy."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import pytest
import ray
import torch

from rlstack.config import RunConfig
from rlstack.driver import Trainer
from rlstack.learner import LearnerConfig, LearnerGroup, collate
from rlstack.mispo import AlgorithmConfig, MISFilter, compute_advantages
from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.group import RolloutGroup
from rlstack.rollout.worker import Prompt
from rlstack.types import Rollout

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.deepspeed]

PROMPTS = [Prompt(f"p{i}", text=f"<|user|>What is {i}{i}+{7 * i}?<|assistant|>") for i in range(4)]
FIXED = SamplingConfig(n=2, max_tokens=16, seed=7)  # the same sequences for a given policy


def broadcast_run(run_dir: Path, weight_sync: str) -> RunConfig:
    """A 2-step run as small as tests/integration/test_driver.py's, syncing by broadcast in 1 MiB buckets."""
    return RunConfig.model_validate(
        {
            "trainer": {"run_dir": str(run_dir), "steps": 2, "prompts_per_step": 4},
            "rollout": {"sampling": {"n": 4, "max_tokens": 24}, "weight_sync": weight_sync, "bucket_mb": 1},
            "learner": {"micro_batch_size": 16, "zero_stage": 2, "lr": 1e-3},
            "algorithm": {"traj_filter": "off"},
            "eval": {"num_problems": 8, "samples": 1},
            "rewards": [{"import_path": "toy_rewards:digit_fraction"}],
        }
    )


def logprob_gap(learner: LearnerGroup, rollouts: list[Rollout]) -> float:
    """Largest |learner log-prob − vLLM's sampled log-prob| over the rollouts' response tokens."""
    batch = collate(rollouts, pad_id=0)
    mask = batch.loss_mask.bool()
    return (learner.compute_logprobs(batch)[mask] - batch.rollout_logp[mask]).abs().max().item()


def train_two_steps_and_check_the_engines(run_dir: Path, weight_sync: str) -> None:
    with Trainer(broadcast_run(run_dir, weight_sync)) as trainer:
        before = trainer.rollout.generate(PROMPTS, FIXED)  # made by version 0
        assert logprob_gap(trainer.learner, before) < 1e-3

        def no_driver_hop() -> NoReturn:
            raise AssertionError(f"weight_sync={weight_sync!r} exported the weights to the driver")

        trainer.learner.export_weights = no_driver_hop  # type: ignore[method-assign]
        steps = [trainer.step() for _ in range(2)]

        assert trainer.learner.version == trainer.rollout.version == 2
        assert ray.get([w.get_version.remote() for w in trainer.rollout.workers]) == [2]
        for m in steps:
            assert m["sync/bytes"] > 0 and m["sync/buckets"] >= 1, m
            assert m["sync/total_seconds"] >= m["sync/seconds"] > 0
        assert any(m["actor/grad_norm"] > 0 for m in steps)
        # the policy moved (so the agreement below is not vacuous) ...
        assert logprob_gap(trainer.learner, before) > 1e-3
        # ... and vLLM now serves exactly the learner's new policy
        after = trainer.rollout.generate(PROMPTS, FIXED)
        assert {r.version for r in after} == {2}
        assert logprob_gap(trainer.learner, after) < 1e-3


def test_trainer_with_gloo_weight_sync_broadcasts_from_the_learner(tmp_path: Path) -> None:
    train_two_steps_and_check_the_engines(tmp_path / "gloo", "gloo")


@pytest.mark.gpu
def test_trainer_with_nccl_weight_sync_broadcasts_from_the_learner_gpu(tmp_path: Path) -> None:
    """The same over NCCL: needs CUDA GPUs for the learner and the vLLM engines (a CUDA build of vLLM)."""
    assert torch.cuda.is_available(), (
        "this test needs a CUDA GPU (rollout.weight_sync=nccl broadcasts over NCCL) and torch with CUDA; "
        f"this machine has torch {torch.__version__} and no usable GPU. It is marked `gpu` and deselected "
        "in CI (scripts/test.sh: -m 'not slow and not gpu'); run it on a GPU machine with `-m gpu`."
    )
    train_two_steps_and_check_the_engines(tmp_path / "nccl", "nccl")


def test_two_zero3_ranks_push_over_gloo_into_a_rollout_group(tiny_checkpoint: Path) -> None:
    """LearnerGroup-level: 2 ZeRO-3 ranks (the export is a collective gather), rank 0 broadcasts."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rollout = learner = None
    try:
        config = RolloutConfig(sampling=SamplingConfig(n=4, max_tokens=16), weight_sync="gloo", bucket_mb=1)
        rollout = RolloutGroup(tiny_checkpoint, config)
        learner = LearnerGroup(
            tiny_checkpoint,
            LearnerConfig(num_ranks=2, zero_stage=3, cpus_per_rank=0.5, micro_batch_size=8, lr=1e-3),
        )
        learner.attach_weight_sync(rollout.weight_sync)

        rollouts = rollout.generate(PROMPTS)
        for r in rollouts:  # a reward that prefers longer responses, so the update is not empty
            r.reward = float(len(r.response_ids))
        cfg = AlgorithmConfig(traj_filter="off")
        batch = collate(rollouts, pad_id=0)
        batch = batch.replace(old_logp=learner.compute_logprobs(batch))
        batch = batch.replace(filter=MISFilter(cfg)(batch.old_logp, batch.rollout_logp, batch.loss_mask))
        advantages, _ = compute_advantages(cfg, batch.rewards, batch.loss_mask, group_ids=batch.group_ids)
        learner.train_step(batch.replace(advantages=advantages), cfg)
        assert learner.version == 1 and logprob_gap(learner, rollouts) > 1e-3  # the policy moved

        stats = learner.push_weights(learner.version)
        assert stats["sync/bytes"] > 10e6 and stats["sync/buckets"] >= 5  # all 10.6 MiB, in 1 MiB buckets
        assert ray.get([w.get_version.remote() for w in rollout.workers]) == [1]
        fresh = rollout.generate(PROMPTS)
        assert {r.version for r in fresh} == {1}
        assert logprob_gap(learner, fresh) < 1e-3

        again = learner.push_weights(2)  # rank 0 remembers what the engines hold: nothing changed
        assert again["sync/bytes"] == 0 and ray.get(rollout.workers[0].get_version.remote()) == 2
    finally:
        if learner is not None:
            learner.shutdown()  # closes rank 0's process group with the engines (they leave it too)
        if rollout is not None:
            rollout.shutdown()
        ray.shutdown()
