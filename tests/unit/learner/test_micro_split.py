"""Micro-batches by a token budget (`learner.micro_batch_tokens`): rows binned longest first, each forward
within the budget (a longer row alone), and the update, pi_old and scores equal to fixed-row micro-batches."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from rlstack.learner import logprobs
from rlstack.learner.batch import PolicyBatch, collate
from rlstack.learner.micro import MicroSplit
from rlstack.learner.scoring import score_rows
from rlstack.learner.step import LocalReducer, TorchSink, accumulate_minibatch, padded_micro_batches
from rlstack.mispo import AlgorithmConfig, compute_advantages
from rlstack.model import Step3p5ForCausalLM
from rlstack.types import Rollout

BUDGET = 128
CFG = AlgorithmConfig(name="mispo", traj_filter="fixed", token_band=(0.3, 3.0), traj_band=(0.5, 2.0))


def long_tailed_batch(policy: Step3p5ForCausalLM, n: int = 24, seed: int = 0) -> PolicyBatch:
    """n rollouts in groups of 4 with log-normal response lengths (median ~12, a few near 120 tokens) and
    rewards mixed in odd groups, alike in even ones; advantages set, rollout log-probs near the policy's."""
    rng = random.Random(seed)
    rollouts = []
    for i in range(n):
        length = 100 if i == 5 else min(int(rng.lognormvariate(2.5, 0.9)) + 1, 120)  # row 5: the tail
        prompt = [1] + [rng.randrange(4, 128) for _ in range(rng.randrange(2, 8))]
        response = [rng.randrange(4, 128) for _ in range(length)]
        rollouts.append(
            Rollout(
                prompt_id=f"p{i // 4}", prompt_ids=prompt, response_ids=response,
                response_logprobs=[-4.8] * length, response_mask=[1] * length, finish_reason="stop",
                version=0, reward=float(i % 2) if (i // 4) % 2 else 1.0,  # even groups: no signal
            )
        )  # fmt: skip
    batch = collate(rollouts, pad_id=0)
    adv, _ = compute_advantages(CFG, batch.rewards, batch.loss_mask, group_ids=batch.group_ids)
    with torch.no_grad():
        old = logprobs.token_logprobs(policy, batch.input_ids, batch.attention_mask)  # (B, L)
    noise = 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(seed))
    return batch.replace(advantages=adv, rollout_logp=(old + noise) * batch.loss_mask)


def test_the_budget_bins_rows_longest_first_and_every_row_once() -> None:
    lengths = torch.tensor([30, 200, 5, 90, 70, 40, 160, 10])
    plan = MicroSplit(rows=2, tokens=160).plan(lengths)
    rows = sorted(int(r) for part in plan for r in part)
    assert rows == list(range(len(lengths)))
    for part in plan:
        assert len(part) == 1 or int(lengths[part].sum()) <= 160, (part, lengths[part])
        assert part.tolist() == sorted(part.tolist())  # ascending: contiguous runs are views
    assert [1] in [p.tolist() for p in plan]  # longer than the budget: alone
    # first-fit decreasing: [200] [160] [90 70] [40 30 10 5]; the row count (2) no longer caps a forward
    assert [p.tolist() for p in plan] == [[1], [6], [3, 4], [0, 2, 5, 7]]
    assert [p.tolist() for p in MicroSplit(rows=3).plan(lengths)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ValueError, match="at least 1"):
        MicroSplit(rows=2, tokens=0)


def _count_forwards(model: torch.nn.Module) -> list[int]:
    """One entry per forward `model` runs from now on."""
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(1))
    return seen


@pytest.mark.parametrize("pack", [False, True])
def test_a_token_budget_gives_the_update_and_pi_old_of_fixed_rows(policy: Step3p5ForCausalLM, pack) -> None:
    """pi_old from the training forward (the demo's path) with the zero-signal skip: token-budget micro-
    batches give the gradients, the metrics and pi_old (in row order) of 2-row micro-batches, with half the
    forwards or fewer."""
    logprobs.set_pack_sequences(pack)
    batch = long_tailed_batch(policy)
    lengths = batch.attention_mask.sum(-1)  # (B,)
    assert int(lengths.max()) > BUDGET // 2 and float(lengths.median()) < BUDGET / 4

    def update(
        split: MicroSplit,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float], torch.Tensor, list[int]]:
        model = copy.deepcopy(policy)
        tokens = _count_forwards(model)
        out: list[torch.Tensor] = []
        stats = accumulate_minibatch(
            model, batch.replace(old_logp=None), CFG, TorchSink(), LocalReducer(), split,
            old_from_forward=True, old_logp_out=out,
        )  # fmt: skip
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return grads, stats.all_reduce(LocalReducer()).result(), out[0], tokens

    g_rows, m_rows, old_rows, forwards = update(MicroSplit(rows=2))
    g_tok, m_tok, old_tok, tokens = update(MicroSplit(rows=2, tokens=BUDGET))
    assert len(tokens) <= len(forwards) / 2
    assert float((old_tok - old_rows).abs().max()) <= 1e-5
    assert float(old_tok[batch.loss_mask.bool()].abs().min()) > 0.0  # every row's pi_old came back
    scale = max(float(g.abs().max()) for g in g_rows.values())
    assert scale > 0 and max(float((g_tok[k] - g_rows[k]).abs().max()) for k in g_rows) <= 1e-5 * scale
    assert m_tok["actor/loss"] == pytest.approx(m_rows["actor/loss"], rel=1e-5, abs=1e-7)
    assert m_tok["actor/skipped_rows"] == m_rows["actor/skipped_rows"] > 0  # groups without signal


def test_scores_come_back_in_row_order(policy: Step3p5ForCausalLM) -> None:
    """score_rows (reference / value scoring) reorders the binned micro-batches back to the batch's rows."""
    batch = long_tailed_batch(policy)

    def logp(ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return logprobs.token_logprobs(policy, ids, attn)

    by_rows = score_rows(policy, batch, logp, MicroSplit(rows=5), LocalReducer(), torch.device("cpu"))
    by_tokens = score_rows(
        policy, batch, logp, MicroSplit(tokens=BUDGET), LocalReducer(), torch.device("cpu")
    )
    assert by_rows.shape == by_tokens.shape == batch.input_ids.shape
    assert float((by_rows - by_tokens).abs().max()) <= 1e-5 and float(by_rows.abs().sum()) > 0


def test_ranks_pad_to_the_same_count_of_budget_micro_batches(policy: Step3p5ForCausalLM) -> None:
    """Every micro-batch of a shard is a real one with its rows; pads (for ranks with fewer) hold none."""
    batch = long_tailed_batch(policy)
    micro = padded_micro_batches(batch, MicroSplit(tokens=BUDGET), LocalReducer(), at_least=8)
    real = [m for m in micro if not m.pad]
    assert len(micro) >= 8 and sorted(int(r) for m in real for r in m.rows) == list(range(len(batch)))
    assert all(bool((m.batch.input_ids == batch.input_ids[m.rows]).all()) for m in real)
    assert all(float(m.batch.loss_mask.sum()) == 0.0 for m in micro if m.pad)
