"""Rollout (vLLM) and learner (DeepSpeed) actors agree on log-probs before and after an in-place sync."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from rlstack.learner import LearnerConfig, LearnerGroup, collate
from rlstack.mispo import AlgorithmConfig, MISFilter, compute_advantages
from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.group import RolloutGroup
from rlstack.rollout.worker import Prompt
from rlstack.types import Rollout

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.deepspeed]

PROMPTS = [Prompt(f"p{i}", text=f"<|user|>What is {i}{i}+{7 * i}?<|assistant|>") for i in range(8)]


@pytest.fixture(scope="module")
def actors(tiny_checkpoint: Path) -> Iterator[tuple[RolloutGroup, LearnerGroup]]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rollout = RolloutGroup(tiny_checkpoint, RolloutConfig(sampling=SamplingConfig(n=4, max_tokens=16)))
    learner = LearnerGroup(tiny_checkpoint, LearnerConfig(lr=1e-3, micro_batch_size=16))
    yield rollout, learner
    rollout.shutdown()
    learner.shutdown()
    ray.shutdown()


def max_logprob_gap(learner: LearnerGroup, rollouts: list[Rollout]) -> float:
    batch = collate(rollouts, pad_id=0)
    old = learner.compute_logprobs(batch)  # (B, L)
    mask = batch.loss_mask.bool()
    return (old[mask] - batch.rollout_logp[mask]).abs().max().item()


def test_learner_and_vllm_agree_before_and_after_a_synced_update(
    actors: tuple[RolloutGroup, LearnerGroup],
) -> None:
    rollout, learner = actors
    rollouts = rollout.generate(PROMPTS)
    assert max_logprob_gap(learner, rollouts) < 1e-3

    # one MIS-PO step with a reward that prefers longer responses, so the update is not empty
    for r in rollouts:
        r.reward = float(len(r.response_ids))
    batch = collate(rollouts, pad_id=0)
    cfg = AlgorithmConfig(traj_filter="off")
    batch = batch.replace(old_logp=learner.compute_logprobs(batch))
    batch = batch.replace(filter=MISFilter(cfg)(batch.old_logp, batch.rollout_logp, batch.loss_mask))
    advantages, _ = compute_advantages(cfg, batch.rewards, batch.loss_mask, group_ids=batch.group_ids)
    before = learner.compute_logprobs(batch)
    metrics = learner.train_step(batch.replace(advantages=advantages), cfg)
    assert metrics["actor/grad_norm"] > 0 and learner.version == 1
    assert (learner.compute_logprobs(batch) - before).abs().max() > 1e-3  # the policy really moved

    stats = rollout.update_weights(learner.export_weights(), learner.version)
    assert stats["sync/bytes"] > 0 and rollout.version == 1
    fresh = rollout.generate(PROMPTS)
    assert {r.version for r in fresh} == {1}
    assert max_logprob_gap(learner, fresh) < 1e-3  # vLLM now serves exactly the learner's new policy


def test_empty_and_eos_only_responses_flow_through_the_learner(
    actors: tuple[RolloutGroup, LearnerGroup],
) -> None:
    _, learner = actors
    rows = [
        Rollout("a", [5, 6, 7], [], [], "stop", 0, reward=1.0),  # empty response
        Rollout("a", [5, 6, 7], [2], [-0.5], "stop", 0, reward=0.0),  # EOS only
        Rollout("b", [5, 6], [9, 2], [-1.0, -0.2], "stop", 0, reward=1.0),
        Rollout("b", [5, 6], [9, 9], [-1.0, -1.0], "length", 0, reward=0.0),
    ]
    batch = collate(rows, pad_id=0)
    cfg = AlgorithmConfig(traj_filter="off", token_band=(1e-9, 1e9))
    batch = batch.replace(old_logp=learner.compute_logprobs(batch))
    advantages, _ = compute_advantages(cfg, batch.rewards, batch.loss_mask, group_ids=batch.group_ids)
    metrics = learner.train_step(batch.replace(advantages=advantages), cfg)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values() if isinstance(v, float))
