"""MoE load balancing on the tiny policy: the EP-group balanced routing loss and the auxiliary-loss-free
bias update each move a deliberately imbalanced router toward balance within a few steps; expert-health
metrics say how imbalanced it is."""

from __future__ import annotations

import pytest
import torch

from rlstack.learner.batch import PolicyBatch
from rlstack.learner.config import MoEConfig
from rlstack.learner.logprobs import token_logprobs
from rlstack.learner.moe import balance_loss, health_metrics, routing_arrays, update_router_bias
from rlstack.learner.step import LocalReducer, TorchSink, accumulate_minibatch
from rlstack.mispo import AlgorithmConfig, compute_advantages
from rlstack.model import Step3p5ForCausalLM
from rlstack.model.builders import tiny

IDS = torch.randint(3, 128, (16, 24), generator=torch.Generator().manual_seed(0))  # (B, T)
LAYERS = [1, 2, 3]


def _model() -> Step3p5ForCausalLM:
    torch.manual_seed(0)
    return Step3p5ForCausalLM(tiny()).float()


def _max_violation(model: Step3p5ForCausalLM) -> float:
    with torch.no_grad():
        out = model(IDS, attention_mask=torch.ones_like(IDS), output_router_stats=True)
    arrays = routing_arrays(out.router_stats, torch.ones_like(IDS))
    return health_metrics(arrays, LAYERS)["moe/max_violation"]


def _skew_router(model: Step3p5ForCausalLM) -> None:
    """Point experts 0 and 1 of every MoE layer at the mean of that layer's router input, so nearly every
    token picks them."""
    inputs: list[torch.Tensor] = []
    blocks = [layer.moe for layer in model.model.layers if layer.is_moe]
    hooks = [b.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach())) for b in blocks]
    with torch.no_grad():
        model(IDS)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for block, x in zip(blocks, inputs, strict=True):
            mean = x.mean(0)  # (H,)
            block.gate.weight[:2] = 4.0 * mean / mean.pow(2).sum()


def test_balance_loss_is_one_at_balance_and_groups_must_divide_the_experts() -> None:
    model = _model()
    out = model(IDS, output_router_stats=True)
    plain = balance_loss(out.router_stats, None)
    assert plain.requires_grad and 1.0 <= float(plain) < 1.5  # near-balanced random router
    assert float(balance_loss(out.router_stats, 8)) == pytest.approx(float(plain))
    assert float(balance_loss(out.router_stats, 1)) == pytest.approx(1.0)  # one group: always balanced
    with pytest.raises(ValueError, match="does not divide the 8 experts"):
        balance_loss(out.router_stats, 3)


@pytest.mark.parametrize("groups", [None, 4])
def test_balancing_loss_rebalances_a_skewed_router(groups: int | None) -> None:
    model = _model()
    _skew_router(model)
    before = _max_violation(model)
    assert before > 2.0, before  # experts 0 and 1 take most of the load (perfect: 0, worst: 3)
    optimizer = torch.optim.Adam([b.moe.gate.weight for b in model.model.layers if b.is_moe], lr=0.05)
    for _ in range(10):
        out = model(IDS, output_router_stats=True)
        loss = balance_loss(out.router_stats, groups)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _max_violation(model)
    assert after < before / 2, (before, after)


def test_bias_update_rebalances_without_touching_the_weights() -> None:
    model = _model()
    _skew_router(model)
    gates = [b.moe.gate.weight.clone() for b in model.model.layers if b.is_moe]
    before = _max_violation(model)
    for _ in range(10):
        with torch.no_grad():
            out = model(IDS, output_router_stats=True)
        load = torch.stack([s.expert_counts for s in out.router_stats]).double()  # (L, E)
        update_router_bias(model, load, rate=0.05)
    after = _max_violation(model)
    assert after < before / 2, (before, after)
    assert all(
        torch.equal(g, b.moe.gate.weight)
        for g, b in zip(gates, (b for b in model.model.layers if b.is_moe), strict=True)
    )
    assert (
        float(model.model.layers[1].moe.router_bias[:2].max())
        < 0
        < float(model.model.layers[1].moe.router_bias[2:].min())
    )


def test_learner_step_adds_the_balancing_loss_and_reports_routing_facts(ragged_batch: PolicyBatch) -> None:
    model = _model()
    _skew_router(model)
    algo = AlgorithmConfig(name="grpo", traj_filter="off")
    with torch.no_grad():
        old = (
            token_logprobs(model, ragged_batch.input_ids, ragged_batch.attention_mask)
            * ragged_batch.loss_mask
        )
    adv, _ = compute_advantages(
        algo, ragged_batch.rewards, ragged_batch.loss_mask, group_ids=ragged_batch.group_ids
    )
    batch = ragged_batch.replace(old_logp=old, rollout_logp=old, advantages=adv)
    plain = accumulate_minibatch(model, batch, algo, TorchSink(), LocalReducer(), 4)
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    moe = MoEConfig(balance_coef=0.1)
    balanced = accumulate_minibatch(model, batch, algo, TorchSink(), LocalReducer(), 4, moe=moe)
    assert "moe/balance_loss" not in plain.sums and balanced.sums["moe/balance_loss"] > 1.0
    assert balanced.sums["actor/loss"] == pytest.approx(plain.sums["actor/loss"])  # the policy loss alone
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.allclose(grads["lm_head.weight"], plain_grads["lm_head.weight"])  # above the routers
    gate = "model.layers.3.moe.gate.weight"
    assert not torch.allclose(grads[gate], plain_grads[gate])  # the balancing loss reaches the router
    load = balanced.arrays["moe/expert_tokens"]  # (L, E), real tokens only, top-2 each
    assert load.shape == (3, 8) and load.sum() == 3 * 2 * batch.attention_mask.sum()
