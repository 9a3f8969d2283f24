"""Routing replay (R3) against a real vLLM engine: the engine records the experts it routed every fed
token to, the learner's forward replays exactly those, the router keeps its gradient, and on a bf16
engine (whose routing differs from the fp32 learner's) replay narrows the log-prob gap."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from rlstack.learner.batch import PolicyBatch, collate
from rlstack.learner.logprobs import SamplingTransform, score_tokens
from rlstack.learner.moe import logp_gap, routing_mismatch
from rlstack.model import Step3p5ForCausalLM
from rlstack.model.tokenizer import build_tokenizer
from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.parity import synthetic_prompts
from rlstack.rollout.worker import Prompt, RolloutWorker
from rlstack.types import Rollout

pytestmark = pytest.mark.vllm

SAMPLING = SamplingConfig(n=4, max_tokens=40, temperature=1.0, seed=11)


def _rollouts(path: Path, dtype: str, multiprocessing: bool = False) -> list[Rollout]:
    config = RolloutConfig(dtype=dtype, sampling=SAMPLING, kv_cache_mb=32, multiprocessing=multiprocessing)
    worker = RolloutWorker(path, config, record_routing=True)
    try:
        prompts = [Prompt(f"p{i}", text=t) for i, t in enumerate(synthetic_prompts(8, seed=5))]
        return worker.generate(prompts)
    finally:
        worker.shutdown()


@pytest.fixture(scope="module")
def bf16_batch(tiny_checkpoint: Path) -> PolicyBatch:
    return collate(_rollouts(tiny_checkpoint, "bfloat16"), pad_id=0)


@pytest.fixture(scope="module")
def learner(tiny_checkpoint: Path) -> Iterator[Step3p5ForCausalLM]:
    yield Step3p5ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def test_fp32_engine_records_exactly_the_learners_routing(
    tiny_checkpoint: Path, learner: Step3p5ForCausalLM
) -> None:
    """The record covers prompt and response, position by position, in the rollout's index space; with
    the engine's default multiprocessing core the records cross a process boundary."""
    rollouts = _rollouts(tiny_checkpoint, "float32", multiprocessing=True)
    for r in rollouts:
        assert r.routed_experts is not None and r.routed_experts.dtype == np.uint8
        assert r.routed_experts.shape == (len(r.prompt_ids) + len(r.response_ids), 3, 2)
        assert (r.routed_experts[-1] == 255).all() and (r.routed_experts[:-1] < 8).all()  # last: never fed
    batch = collate(rollouts, pad_id=0)
    assert batch.rollout_experts is not None
    with torch.no_grad():
        free = score_tokens(learner, batch.input_ids, batch.attention_mask)
    assert free.expert_ids is not None
    differ, total = routing_mismatch(free.expert_ids, batch.rollout_experts, batch.attention_mask)
    assert total == int(batch.attention_mask.sum()) * 3 - len(rollouts) * 3  # every fed position, 3 layers
    assert differ == 0


def test_replay_selects_the_recorded_experts_and_the_router_keeps_its_gradient(
    bf16_batch: PolicyBatch, learner: Step3p5ForCausalLM
) -> None:
    recorded = bf16_batch.rollout_experts
    assert recorded is not None
    scores = score_tokens(learner, bf16_batch.input_ids, bf16_batch.attention_mask, routed_experts=recorded)
    assert scores.expert_ids is not None
    valid = (recorded[..., 0] >= 0) & bf16_batch.attention_mask.bool()[..., None]  # (B, T, L)
    for layer in range(recorded.shape[2]):
        used = scores.expert_ids[:, :, layer].sort(-1).values  # (B, T, k)
        want = recorded[:, :, layer].long().sort(-1).values
        assert torch.equal(used[valid[:, :, layer]], want[valid[:, :, layer]]), f"MoE layer {layer}"
    learner.zero_grad()
    (scores.logp * bf16_batch.loss_mask).sum().backward()
    for i, layer in enumerate(m for m in learner.model.layers if m.is_moe):
        grad = layer.moe.gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"MoE layer {i}: the router got no gradient"
    learner.zero_grad()


def test_replay_narrows_the_logprob_gap_to_a_bf16_engine(
    bf16_batch: PolicyBatch, learner: Step3p5ForCausalLM
) -> None:
    b = bf16_batch
    assert b.rollout_experts is not None
    transform = SamplingTransform.from_sampling(SAMPLING)
    with torch.no_grad():
        free = score_tokens(learner, b.input_ids, b.attention_mask, transform=transform)
        replay = score_tokens(
            learner, b.input_ids, b.attention_mask, transform=transform, routed_experts=b.rollout_experts
        )
    assert free.expert_ids is not None
    differ, total = routing_mismatch(free.expert_ids, b.rollout_experts, b.attention_mask)
    assert differ > 0, "the bf16 engine routed every token like the fp32 learner: nothing to replay"
    gap_free, n = logp_gap(free.logp, b.rollout_logp, b.loss_mask)
    gap_replay, _ = logp_gap(replay.logp, b.rollout_logp, b.loss_mask)
    print(
        f"routing mismatch {differ}/{total}; mean |gap| free {gap_free / n:.4f} replay {gap_replay / n:.4f}"
    )
    assert gap_replay < gap_free


def test_router_bias_reaches_vllm_by_export_and_by_in_place_sync(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A moved selection bias (the aux-loss-free balancer's state) is served by vLLM exactly as the learner
    routes with it: from a saved checkpoint, and pushed in place into a running engine (the router holds
    the bias tensor vLLM reloads; a stale copy would route with the old bias)."""
    from rlstack.rollout.sync.object_store import serialize_state_dict

    model = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        for block in (layer.moe for layer in model.model.layers if layer.is_moe):
            block.router_bias.copy_(torch.linspace(0.3, -0.3, 8))  # favours the low experts strongly
    moved = tmp_path / "moved"
    model.save_pretrained(moved)
    build_tokenizer().save_pretrained(moved)

    config = RolloutConfig(sampling=SAMPLING, kv_cache_mb=32)
    prompts = [Prompt(f"p{i}", text=t) for i, t in enumerate(synthetic_prompts(4, seed=9))]

    def gap(rollouts: list[Rollout]) -> float:
        b = collate(rollouts, pad_id=0)
        with torch.no_grad():
            logp = score_tokens(model, b.input_ids, b.attention_mask, with_routing=False).logp
        return float((logp - b.rollout_logp)[b.loss_mask.bool()].abs().max())

    fresh = RolloutWorker(moved, config)
    try:
        assert gap(fresh.generate(prompts)) < 1e-3
    finally:
        fresh.shutdown()
    worker = RolloutWorker(tiny_checkpoint, config)
    try:
        assert gap(worker.generate(prompts)) > 1e-2  # the old bias routes differently: not vacuous
        worker.update_weights(serialize_state_dict(model.state_dict()), version=1)
        assert gap(worker.generate(prompts)) < 1e-3
    finally:
        worker.shutdown()
