"""Accumulation arithmetic without DeepSpeed: 8x1 == 1x8 micro-batches, and N data-parallel ranks (threads
with a barrier all-reduce, gradients averaged as data parallelism does) == one rank on the whole batch."""

from __future__ import annotations

import copy

import pytest
import torch
from thread_ranks import RankReducer, run_on_ranks

from rlstack.learner.batch import PolicyBatch
from rlstack.learner.step import LocalReducer, MetricSums, TorchSink, accumulate_minibatch
from rlstack.mispo import AlgorithmConfig, MISFilter, compute_advantages
from rlstack.model import Step3p5ForCausalLM

CONFIGS = [
    AlgorithmConfig(name="mispo", traj_filter="off", token_band=(0.3, 3.0)),
    # a wide adaptive band: the batch's rollout log-probs are noisy, a paper-width band would reject all
    AlgorithmConfig(name="mispo", traj_filter="adaptive", adaptive_log_band_max=1.0, loss_norm="seq_mean"),
    AlgorithmConfig(name="grpo", traj_filter="off", tis_cap=2.0),
]


def _prepared(policy: Step3p5ForCausalLM, batch: PolicyBatch, cfg: AlgorithmConfig) -> PolicyBatch:
    """old log-probs from the policy, a batch-level MIS filter and group advantages, as the driver does."""
    from rlstack.learner.logprobs import token_logprobs

    with torch.no_grad():
        old = token_logprobs(policy, batch.input_ids, batch.attention_mask) * batch.loss_mask
    # the rollout engine's log-probs: pi_old plus noise, so that the MIS bands accept some tokens, not all
    noise = torch.randn(old.shape, generator=torch.Generator().manual_seed(0))
    batch = batch.replace(rollout_logp=(old + 0.7 * noise) * batch.loss_mask)
    flt = MISFilter(cfg)(old, batch.rollout_logp, batch.loss_mask)
    adv, _ = compute_advantages(cfg, batch.rewards, batch.loss_mask, group_ids=batch.group_ids)
    return batch.replace(old_logp=old, advantages=adv, filter=flt)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal up to summation-order rounding, measured against the tensor's scale (elements near 0 of a
    tensor whose other entries are ~1 carry absolute rounding errors of ~1e-7 too)."""
    err = float((actual - expected).abs().max())
    assert err <= 1e-5 * float(expected.abs().max()) + 1e-8, (name, err)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(policy, batch, cfg, micro_batch_size):
    model = copy.deepcopy(policy)
    stats = accumulate_minibatch(model, batch, cfg, TorchSink(), LocalReducer(), micro_batch_size)
    return _grads(model), stats.all_reduce(LocalReducer()).result()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}-{c.traj_filter}-{c.loss_norm}")
def test_one_micro_batch_of_8_equals_8_of_1(policy, ragged_batch, cfg) -> None:
    batch = _prepared(policy, ragged_batch, cfg)
    g_full, m_full = _run(policy, batch, cfg, micro_batch_size=8)
    g_micro, m_micro = _run(policy, batch, cfg, micro_batch_size=1)
    assert g_full.keys() == g_micro.keys() and len(g_full) > 0
    assert 0.0 < m_full["actor/train_frac"] <= 1.0
    if cfg.name == "mispo":
        assert m_full["actor/train_frac"] < 1.0  # the MIS masks rejected some tokens
    assert g_full["lm_head.weight"].abs().max() > 1e-4
    for name in g_full:
        _assert_close(g_micro[name], g_full[name], name)
    keys = ("actor/loss", "actor/entropy", "actor/routing_confidence", "batch/tokens", "actor/train_frac")
    for key in keys:
        assert m_micro[key] == pytest.approx(m_full[key], rel=1e-5, abs=1e-7), key
    assert m_full["batch/tokens"] == float(batch.loss_mask.sum())


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}-{c.traj_filter}-{c.loss_norm}")
def test_two_ranks_with_averaged_grads_equal_one_rank(policy, ragged_batch, cfg) -> None:
    batch = _prepared(policy, ragged_batch, cfg).select(slice(0, 7))  # 7 rows: shards of 4 and 3
    g_one, m_one = _run(policy, batch, cfg, micro_batch_size=7)

    shards = batch.split(2)
    models = [copy.deepcopy(policy) for _ in range(2)]

    def rank_main(r: int, reducer: RankReducer) -> dict[str, float]:
        # micro-batch size 3: rank 0 runs 2 micro-batches, rank 1 one real + one inert (padding)
        stats: MetricSums = accumulate_minibatch(models[r], shards[r], cfg, TorchSink(), reducer, 3)
        return stats.all_reduce(reducer).result()

    results = run_on_ranks(2, rank_main)
    grads = [_grads(m) for m in models]
    for name, g in g_one.items():
        averaged = (grads[0][name] + grads[1][name]) / 2  # what data-parallel all-reduce does
        _assert_close(averaged, g, name)
    assert results[0] == results[1]  # metrics are global: identical on every rank
    for key in ("actor/loss", "actor/entropy", "batch/tokens", "batch/sequences", "actor/routing_confidence"):
        assert results[0][key] == pytest.approx(m_one[key], rel=1e-5, abs=1e-7), key


def test_missing_inputs_are_reported(policy, ragged_batch) -> None:
    cfg = AlgorithmConfig(traj_filter="off")
    with pytest.raises(ValueError, match="old_logp is None"):
        accumulate_minibatch(policy, ragged_batch, cfg, TorchSink(), LocalReducer(), 4)
    with pytest.raises(ValueError, match="advantages is None"):
        with_old = ragged_batch.replace(old_logp=ragged_batch.rollout_logp)
        accumulate_minibatch(policy, with_old, cfg, TorchSink(), LocalReducer(), 4)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2]], ids=lambda c: f"{c.name}-{c.traj_filter}")
def test_pi_old_from_the_training_forward_equals_a_separate_pass(policy, ragged_batch, cfg) -> None:
    """learner.fuse_old_logp: before the step's optimizer step the training forward IS pi_old, so taking it
    from there (and filtering per micro-batch) gives the gradients, metrics and pi_old of the two-pass
    path (micro-batches of 3 over 8 rows: the stateless filter per micro-batch equals the batch filter)."""
    separate = _prepared(policy, ragged_batch, cfg)
    g_two, m_two = _run(policy, separate, cfg, micro_batch_size=3)

    fused_model = copy.deepcopy(policy)
    old_out: list[torch.Tensor] = []
    fused = separate.replace(old_logp=None, filter=None)
    stats = accumulate_minibatch(
        fused_model, fused, cfg, TorchSink(), LocalReducer(), 3, old_from_forward=True, old_logp_out=old_out
    )
    m_one = stats.all_reduce(LocalReducer()).result()
    old = torch.cat(old_out)  # (B, L)
    assert old.shape == separate.old_logp.shape
    torch.testing.assert_close(old * separate.loss_mask, separate.old_logp, rtol=0, atol=1e-5)
    assert (old[:, 0] == 0).all() and (old[~separate.attention_mask.bool()] == 0).all()
    g_one = _grads(fused_model)
    assert g_one.keys() == g_two.keys()
    for name in g_two:
        _assert_close(g_one[name], g_two[name], name)
    for key in ("actor/loss", "actor/train_frac", "filter/token_accept", "batch/tokens"):
        assert m_one[key] == pytest.approx(m_two[key], rel=1e-5, abs=1e-7), key


def test_pi_old_from_the_training_forward_refuses_what_it_cannot_do_exactly(policy, ragged_batch) -> None:
    adaptive = CONFIGS[1]
    batch = _prepared(policy, ragged_batch, adaptive).replace(old_logp=None, filter=None)
    with pytest.raises(ValueError, match="stateless trajectory filter"):
        accumulate_minibatch(policy, batch, adaptive, TorchSink(), LocalReducer(), 4, old_from_forward=True)
    with pytest.raises(ValueError, match="old_logp is None"):  # not asked for: still an error
        accumulate_minibatch(policy, batch, CONFIGS[0], TorchSink(), LocalReducer(), 4)
