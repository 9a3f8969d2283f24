"""Rows without learning signal (every trainable token has advantage 0, or the MIS filter rejected them all)
skip the learner's forward/backward: the update, the loss and the mask-derived metrics equal the unskipped
ones, fewer rows run, and nothing is skipped where the rows still shape the update (KL on trainable rows,
MoE balancing loss or router-bias update, pi_old from the training forward, probe steps, dropout)."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
from thread_ranks import RankReducer, run_on_ranks

from rlstack.learner.batch import PolicyBatch, collate
from rlstack.learner.config import MoEConfig
from rlstack.learner.logprobs import token_logprobs
from rlstack.learner.signal import signal_rows
from rlstack.learner.step import LocalReducer, MetricSums, TorchSink, accumulate_minibatch
from rlstack.mispo import AlgorithmConfig, MISFilter, compute_advantages
from rlstack.model import Step3p5ForCausalLM
from rlstack.types import Rollout

GROUP = 4
# Per group of 4: constant rewards (groups 0 and 2: advantage exactly 0) or mixed ones.
REWARDS = [1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1]
REJECTED = [5, 13]  # rows of mixed groups whose every token the MIS filter rejects
MICRO = 3

CONFIGS = [
    AlgorithmConfig(name="mispo", traj_filter="off", token_band=(0.3, 3.0)),
    AlgorithmConfig(name="mispo", traj_filter="off", token_band=(0.3, 3.0), loss_norm="seq_mean"),
    AlgorithmConfig(name="grpo", traj_filter="off", tis_cap=2.0),  # no MIS masks: rejected rows train
    AlgorithmConfig(name="gspo", traj_filter="off", baseline_mis_masks=True, gspo_clip_eps=0.2),
    AlgorithmConfig(name="mispo", traj_filter="off", token_band=(0.3, 3.0), kl_coef=0.05),
]


def _rollouts(seed: int = 0) -> list[Rollout]:
    """16 ragged rollouts in 4 groups with the rewards of REWARDS, a tool span in every third one."""
    rng = random.Random(seed)
    out = []
    for i, reward in enumerate(REWARDS):
        prompt = [1] + [rng.randrange(4, 128) for _ in range(rng.randrange(1, 7))]
        response = [rng.randrange(4, 128) for _ in range(rng.randrange(3, 14))]
        mask = [1] * len(response)
        if i % 3 == 2 and len(response) > 3:
            mask[1:3] = [0, 0]
        out.append(
            Rollout(
                prompt_id=f"p{i // GROUP}", prompt_ids=prompt, response_ids=response,
                response_logprobs=[-4.8] * len(response), response_mask=mask, finish_reason="stop",
                version=0, reward=float(reward),
            )
        )  # fmt: skip
    return out


def _prepared(policy: Step3p5ForCausalLM, cfg: AlgorithmConfig) -> PolicyBatch:
    """pi_old from the policy, noisy rollout log-probs, the step's MIS filter (rows REJECTED rejected
    whole), group advantages and (for KL) reference log-probs near pi_old."""
    batch = collate(_rollouts(), pad_id=0)
    with torch.no_grad():
        old = token_logprobs(policy, batch.input_ids, batch.attention_mask) * batch.loss_mask  # (B, L)
    gen = torch.Generator().manual_seed(0)
    batch = batch.replace(rollout_logp=(old + 0.5 * torch.randn(old.shape, generator=gen)) * batch.loss_mask)
    flt = MISFilter(cfg)(old, batch.rollout_logp, batch.loss_mask)
    traj = flt.traj_mask.clone()  # (B,)
    traj[REJECTED] = False
    flt = dataclasses.replace(flt, traj_mask=traj, combined=flt.combined & traj[:, None])
    adv, _ = compute_advantages(cfg, batch.rewards, batch.loss_mask, group_ids=batch.group_ids)
    ref = (old + 0.1 * torch.randn(old.shape, generator=gen)) * batch.loss_mask
    return batch.replace(old_logp=old, advantages=adv, filter=flt, ref_logp=ref if cfg.kl_coef else None)


def _count_rows(model: torch.nn.Module) -> list[int]:
    """Rows of every forward `model` runs from now on (appended per call)."""
    rows: list[int] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows.append(int(ids.shape[0]))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return rows


def _update(
    policy: Step3p5ForCausalLM,
    batch: PolicyBatch,
    cfg: AlgorithmConfig,
    skip: bool,
    micro: int = MICRO,
    **kwargs,
) -> tuple[Step3p5ForCausalLM, dict[str, torch.Tensor], dict[str, float], list[int]]:
    """One mini-batch update (accumulate, then AdamW) on a copy of `policy`: the model, its gradients,
    the metrics and the rows of every forward."""
    model = copy.deepcopy(policy)
    rows = _count_rows(model)
    stats = accumulate_minibatch(
        model, batch, cfg, TorchSink(), LocalReducer(), micro, skip_zero_signal=skip, **kwargs
    )
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01).step()
    return model, grads, stats.all_reduce(LocalReducer()).result(), rows


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}-{c.loss_norm}-kl{c.kl_coef}")
def test_skipping_zero_signal_rows_leaves_the_update_unchanged(policy, cfg) -> None:
    batch = _prepared(policy, cfg)
    keep = signal_rows(batch, cfg)  # (B,)
    zero_adv = [i for i in range(len(REWARDS)) if i // GROUP in (0, 2)]
    uses_mis = cfg.name == "mispo" or cfg.baseline_mis_masks
    if cfg.kl_coef > 0.0:  # KL trains every accepted token: zero-advantage rows keep it
        assert keep[zero_adv].all() and not keep[REJECTED].any()
    else:
        assert not keep[zero_adv].any() and bool(keep[REJECTED].any()) != uses_mis
    n_keep = int(keep.sum())
    assert 0 < n_keep < len(batch)

    # Micro-batches of 1: every kept row runs the very same computation, skipped rows add exact zeros, so
    # gradients, loss and the weights after AdamW are bitwise those of the unskipped step.
    full, g_full, m_full, rows_full = _update(policy, batch, cfg, skip=False, micro=1)
    skipped, g_skip, m_skip, rows_skip = _update(policy, batch, cfg, skip=True, micro=1)
    assert rows_full == [1] * len(batch) and rows_skip == [1] * n_keep
    assert _max_diff(g_skip, g_full) == 0.0
    assert _max_diff(_params(skipped), _params(full)) == 0.0
    assert _max_diff(_params(full), _params(policy)) > 1e-4  # the update did move the weights
    assert m_skip["actor/skipped_rows"] == len(batch) - n_keep and m_full["actor/skipped_rows"] == 0.0
    assert m_full["actor/signal_tokens"] > 0.0
    for key in ("actor/loss", "actor/pg_loss", "batch/tokens", "batch/sequences", "actor/signal_tokens"):
        assert m_skip[key] == m_full[key], key
    assert m_skip["actor/train_frac"] == pytest.approx(m_full["actor/train_frac"], rel=1e-12)
    # the MIS filter's numbers describe the whole batch (the dashboards' off-policy health), skipped or not
    filter_keys = [k for k in m_full if k.startswith("filter/")]
    assert "filter/token_accept" in filter_keys
    for key in filter_keys:
        assert m_skip[key] == pytest.approx(m_full[key], rel=1e-9, abs=1e-12), key

    # Micro-batches of 3: the kept rows regroup (3 micro-batches fewer), so sums run in another order;
    # the difference is fp32 rounding, as between micro-batch sizes 3 and 4 without skipping. (Compare
    # gradients: Adam's first step is ~lr * sign(g) where |g| ~ eps and magnifies any such rounding.)
    _, g_full, m_full, rows_full = _update(policy, batch, cfg, skip=False)
    _, g_skip, m_skip, rows_skip = _update(policy, batch, cfg, skip=True)
    assert rows_full == [3, 3, 3, 3, 3, 1]
    assert sum(rows_skip) == n_keep and len(rows_skip) == -(-n_keep // MICRO)  # fewer forwards
    assert max(float(g.abs().max()) for g in g_full.values()) > 1e-2
    assert _max_diff(g_skip, g_full) <= 1e-6
    for key in ("actor/loss", "actor/pg_loss"):
        assert m_skip[key] == pytest.approx(m_full[key], rel=0, abs=1e-6), key
    for key in ("batch/tokens", "batch/sequences", "actor/signal_tokens", "actor/train_frac"):
        assert m_skip[key] == pytest.approx(m_full[key], rel=1e-12), key


def test_a_stateless_filter_computed_per_micro_batch_counts_skipped_rows_alike(policy) -> None:
    """No precomputed batch.filter (a fixed/off trajectory filter is computed per micro-batch): the skipped
    rows' `actor/train_frac` and filter metrics come from the same band as the rows that ran."""
    cfg = CONFIGS[0]
    batch = _prepared(policy, cfg).replace(filter=None)
    _, g_full, m_full, _ = _update(policy, batch, cfg, skip=False, micro=1)
    _, g_skip, m_skip, _ = _update(policy, batch, cfg, skip=True, micro=1)
    assert m_skip["actor/skipped_rows"] > 0 and _max_diff(g_skip, g_full) == 0.0
    assert 0.0 < m_full["actor/train_frac"] < 1.0  # the token band rejects some tokens
    for key in ("actor/train_frac", "filter/token_accept", "filter/traj_accept"):
        assert m_skip[key] == pytest.approx(m_full[key], rel=1e-9), key


def test_a_mini_batch_without_signal_runs_one_inert_forward(policy) -> None:
    cfg = CONFIGS[0]
    batch = _prepared(policy, cfg)
    batch = batch.replace(advantages=torch.zeros_like(batch.advantages))
    _, g_full, m_full, rows_full = _update(policy, batch, cfg, skip=False)
    _, g_skip, m_skip, rows_skip = _update(policy, batch, cfg, skip=True)
    assert rows_skip == [1] and len(rows_full) == 6  # one inert forward: the engine needs a backward
    assert m_skip["actor/skipped_rows"] == len(batch) and m_skip["actor/signal_tokens"] == 0.0
    assert m_skip["batch/tokens"] == m_full["batch/tokens"] == float(batch.loss_mask.sum())
    for key in ("filter/token_accept", "filter/traj_accept", "filter/log_ratio_p50"):
        assert m_skip[key] == pytest.approx(m_full[key], rel=1e-9), key
    assert 0.0 < m_skip["filter/token_accept"] < 1.0
    # no row ran a forward: no entropy to report (left out, not a misleading 0)
    assert "actor/entropy" in m_full and "actor/entropy" not in m_skip
    assert g_skip.keys() == g_full.keys()
    assert all(not g.any() for g in (*g_skip.values(), *g_full.values()))  # every gradient exactly 0


@pytest.mark.parametrize("case", ["balance_loss", "bias_update", "probe", "dropout"], ids=str)
def test_no_skipping_where_the_rows_still_shape_the_update(policy, case) -> None:
    cfg = CONFIGS[0]
    batch = _prepared(policy, cfg)
    assert not signal_rows(batch, cfg).all()
    kwargs: dict = {}
    if case == "balance_loss":
        kwargs["moe"] = MoEConfig(balance_coef=0.01)  # routing of every token is in the loss
    elif case == "bias_update":
        kwargs["moe"] = MoEConfig(bias_update_rate=0.001)  # every token's expert counts move the bias
    elif case == "probe":  # it measures every row's routing (here: all recorded as -1, router's choice)
        _, _, metrics, rows = _update(policy, batch, cfg, skip=True, probe=True)
        assert metrics["actor/skipped_rows"] > 0.0  # no recorded routing: the probe does not run
        B, L = batch.input_ids.shape
        batch = batch.replace(rollout_experts=torch.full((B, L, 3, 2), -1, dtype=torch.int16))
        kwargs["probe"] = True
    else:
        policy = copy.deepcopy(policy)
        policy.config.attention_dropout = 0.1  # fewer rows would shift the dropout masks of the others
    _, _, metrics, rows = _update(policy, batch, cfg, skip=True, **kwargs)
    assert metrics["actor/skipped_rows"] == 0.0
    assert sum(rows) == len(batch) * (2 if case == "probe" else 1)  # the probe: one more forward each


@pytest.mark.parametrize("micro", [1, MICRO])
def test_pi_old_from_the_forward_skips_only_the_backward_of_idle_rows(policy, micro) -> None:
    """The fused path (pi_old from the training forward): idle rows still need pi_old (filter, samples),
    so they run a forward without gradient; pi_old comes out in the batch's row order, the gradients and
    every metric equal the unskipped step's."""
    cfg = AlgorithmConfig(name="mispo", traj_filter="fixed", token_band=(0.3, 3.0), traj_band=(0.5, 2.0))
    batch = _prepared(policy, cfg).replace(old_logp=None, filter=None)
    n_idle = int((~signal_rows(batch, cfg)).sum())
    assert 0 < n_idle < len(batch)
    out_full: list[torch.Tensor] = []
    out_skip: list[torch.Tensor] = []
    _, g_full, m_full, rows_full = _update(
        policy, batch, cfg, skip=False, micro=micro, old_from_forward=True, old_logp_out=out_full
    )
    _, g_skip, m_skip, rows_skip = _update(
        policy, batch, cfg, skip=True, micro=micro, old_from_forward=True, old_logp_out=out_skip
    )
    assert sum(rows_full) == sum(rows_skip) == len(batch)  # every row ran one forward
    assert m_skip["actor/skipped_rows"] == n_idle
    assert len(out_full) == len(out_skip) == 1 and out_skip[0].shape == batch.input_ids.shape
    # micro-batches of 3 regroup the rows (other padded widths): fp32 rounding of log-probs around -10
    assert float((out_skip[0] - out_full[0]).abs().max()) <= (1e-6 if micro == 1 else 1e-5)
    assert float(out_full[0][batch.loss_mask.bool()].abs().min()) > 0.0  # pi_old filled on every token
    assert _max_diff(g_skip, g_full) <= (0.0 if micro == 1 else 1e-6)
    assert m_full.keys() == m_skip.keys()
    # The fused path computes the stateless filter per micro-batch: its quantiles and per-trajectory means
    # are averaged over micro-batches, so they depend on how rows group (as between micro-batch sizes).
    grouped = {"filter/log_ratio_p05", "filter/log_ratio_p50", "filter/log_ratio_p95"}
    grouped.add("filter/abs_log_rho_mean")
    differ = [
        key
        for key in m_full.keys() - {"actor/skipped_rows"} - (grouped if micro > 1 else set())
        if m_skip[key] != pytest.approx(m_full[key], rel=1e-5, abs=1e-6)
    ]
    assert differ == [], differ


def test_a_rank_whose_rows_are_all_skipped_pads_to_the_others_forwards(policy) -> None:
    """Rank 1 holds only zero-advantage rows: it runs inert micro-batches, as many as rank 0 (ZeRO-3
    gathers inside each forward), and the averaged gradients equal one unskipped rank's."""
    cfg = CONFIGS[0]
    batch = _prepared(policy, cfg)
    order = torch.argsort(~signal_rows(batch, cfg), stable=True)  # signal rows first
    batch = batch.select(order)
    shards = batch.split(2)
    assert not signal_rows(shards[1], cfg).any()
    one = copy.deepcopy(policy)
    accumulate_minibatch(one, batch, cfg, TorchSink(), LocalReducer(), MICRO, skip_zero_signal=False)

    models = [copy.deepcopy(policy) for _ in range(2)]
    rows = [_count_rows(m) for m in models]

    def rank_main(r: int, reducer: RankReducer) -> dict[str, float]:
        stats: MetricSums = accumulate_minibatch(models[r], shards[r], cfg, TorchSink(), reducer, MICRO)
        return stats.all_reduce(reducer).result()

    results = run_on_ranks(2, rank_main)
    assert len(rows[0]) == len(rows[1]) == -(-int(signal_rows(shards[0], cfg).sum()) // MICRO)
    assert results[0] == results[1] and results[0]["actor/skipped_rows"] == len(batch) - sum(rows[0])
    scale = max(float(p.grad.abs().max()) for p in one.parameters() if p.grad is not None)
    for p, q, ref in zip(models[0].parameters(), models[1].parameters(), one.parameters(), strict=True):
        assert ref.grad is not None and p.grad is not None and q.grad is not None
        assert float(((p.grad + q.grad) / 2 - ref.grad).abs().max()) <= 1e-6 * scale
