"""collate puts every per-token value at the position of the token it scores; select/split/cat/trim."""

from __future__ import annotations

import pickle

import pytest
import torch

from rlstack.learner.batch import PolicyBatch, collate
from rlstack.mispo import apply_filters
from rlstack.types import Rollout

PAD = 0


def _rollout(pid: str, prompt: list[int], response: list[int], **kw) -> Rollout:
    logps = kw.pop("logps", [-0.1 * (i + 1) for i in range(len(response))])
    return Rollout(
        prompt_id=pid, prompt_ids=prompt, response_ids=response, response_logprobs=logps,
        finish_reason=kw.pop("finish_reason", "stop"), version=kw.pop("version", 0), **kw,
    )  # fmt: skip


@pytest.fixture
def rollouts() -> list[Rollout]:
    return [
        _rollout("a", [1, 5], [7, 8, 9], reward=1.0, version=3),
        _rollout("b", [1, 5, 6, 4], [], reward=0.0, finish_reason="length"),  # empty response
        # a tool call: tokens 20, 21 were inserted by the environment, not sampled
        _rollout("a", [1], [10, 20, 21, 11], response_mask=[1, 0, 0, 1], logps=[-1.0, 9.9, 9.9, -2.0]),
    ]


def test_collate_positions_masks_and_padding(rollouts: list[Rollout]) -> None:
    b = collate(rollouts, pad_id=PAD)
    assert b.input_ids.shape == (3, 5)  # L = max(prompt + response) = 5
    assert b.input_ids.tolist() == [[1, 5, 7, 8, 9], [1, 5, 6, 4, PAD], [1, 10, 20, 21, 11]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # 1 exactly on sampled response tokens: not prompt, padding, or tool output
    assert b.loss_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1]]
    assert b.loss_mask.dtype == torch.float32
    # the log-prob of token t sits at t; 0 off the loss mask (tool tokens' values are dropped)
    torch.testing.assert_close(
        b.rollout_logp,
        torch.tensor([[0, 0, -0.1, -0.2, -0.3], [0, 0, 0, 0, 0], [0, -1.0, 0, 0, -2.0]]),
    )
    assert b.group_ids.tolist() == [0, 1, 0]  # same prompt id -> same group
    assert b.truncated.tolist() == [False, True, False]
    assert b.oldest_versions().tolist() == [3, 0, 0]
    # per-token versions sit at the token's position, 0 off the response
    assert b.token_versions.tolist() == [[0, 0, 3, 3, 3], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert b.rewards[:2].tolist() == [1.0, 0.0] and torch.isnan(b.rewards[2])  # no reward yet -> NaN
    assert b.old_logp is None and b.advantages is None and b.filter is None


def test_collate_rejects_empty_prompt_and_empty_batch() -> None:
    with pytest.raises(ValueError, match="rollout x has an empty prompt"):
        collate([_rollout("x", [], [3, 4])], pad_id=PAD)
    with pytest.raises(ValueError, match="no rollouts"):
        collate([], pad_id=PAD)


def _full_batch(rollouts: list[Rollout]) -> PolicyBatch:
    b = collate(rollouts, pad_id=PAD)
    old = b.rollout_logp + 0.05 * b.loss_mask
    flt = apply_filters(old, b.rollout_logp, b.loss_mask, (0.5, 2.0), None)
    return b.replace(old_logp=old, advantages=torch.randn(3, 5) * b.loss_mask, filter=flt)


def test_select_split_cat_round_trip(rollouts: list[Rollout]) -> None:
    b = _full_batch(rollouts)
    shards = b.split(2)
    assert [len(s) for s in shards] == [2, 1]
    assert [len(s) for s in b.split(5)] == [1, 1, 1, 0, 0]
    again = PolicyBatch.cat(shards)
    for name in (
        "input_ids",
        "loss_mask",
        "rollout_logp",
        "old_logp",
        "advantages",
        "rewards",
        "token_versions",
    ):
        assert torch.equal(torch.nan_to_num(getattr(again, name)), torch.nan_to_num(getattr(b, name))), name
    assert torch.equal(again.filter.combined, b.filter.combined)
    picked = b.select([2, 0])
    assert picked.input_ids.tolist() == [b.input_ids[2].tolist(), b.input_ids[0].tolist()]
    assert torch.equal(picked.filter.log_rho, b.filter.log_rho[[2, 0]])
    assert [len(c) for c in b.chunks(2)] == [2, 1]


def test_trim_and_inert_copy(rollouts: list[Rollout]) -> None:
    b = _full_batch(rollouts).select([1])  # prompt-only row of 4 real tokens in L = 5
    t = b.trim()
    assert t.input_ids.shape == (1, 4) and t.filter.combined.shape == (1, 4)
    full = _full_batch(rollouts)
    inert = full.inert_copy()
    assert inert.loss_mask.sum() == 0 and not inert.filter.combined.any()
    assert torch.equal(inert.input_ids, full.input_ids)


def test_batch_pickles_with_plain_tensors(rollouts: list[Rollout]) -> None:
    b = _full_batch(rollouts)
    again = pickle.loads(pickle.dumps(b))
    assert torch.equal(again.input_ids, b.input_ids)
    assert torch.equal(again.filter.token_mask, b.filter.token_mask)


def test_cat_refuses_mixed_optional_fields(rollouts: list[Rollout]) -> None:
    b = _full_batch(rollouts)
    with pytest.raises(ValueError, match="old_logp is set in some batches"):
        PolicyBatch.cat([b.select([0]), b.select([1]).replace(old_logp=None)])


def test_unscored_rows_leave_the_loss(rollouts: list[Rollout]) -> None:
    b = collate(rollouts, pad_id=PAD)  # row 2 has no reward: NaN
    out = b.without_unscored()
    assert out.loss_mask[:2].tolist() == b.loss_mask[:2].tolist()
    assert float(out.loss_mask[2].abs().sum()) == 0.0 and float(b.loss_mask[2].sum()) > 0
    scored = b.select([0, 1])
    assert scored.without_unscored() is scored  # nothing to do
