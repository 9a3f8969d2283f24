"""Scoring one rank's rows without gradients: log-probs (pi_old), critic values; padded micro-batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlstack.learner.batch import PolicyBatch
from rlstack.learner.micro import MicroSplit
from rlstack.learner.step import Reducer, padded_micro_batches

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, attn) (b, l) -> scores (b, l)


@torch.no_grad()
def score_rows(
    engine: Any,
    batch: PolicyBatch,
    score: Score,
    split: MicroSplit | int,
    reducer: Reducer,
    device: torch.device,
    state_after_last: bool = False,
) -> torch.Tensor:
    """`score(ids, attn) -> (b, l)` over micro-batches of `batch` (padded with inert ones to the largest
    count of any rank, for ZeRO-3's collectives), 0 on padding, back at length L. With `state_after_last`
    one padding column is appended first, so position n_b (scored from the hidden state of the last real
    token) is kept too: (B, L + 1). Collective under ZeRO-3."""
    engine.eval()
    width = batch.seq_len + int(state_after_last)
    out = torch.zeros(len(batch), width)  # (B, L') in the batch's row order
    for m in padded_micro_batches(batch, split, reducer):
        mb = m.batch.trim()
        ids, attn = mb.input_ids, mb.attention_mask  # (b, l)
        if state_after_last:
            ids = torch.nn.functional.pad(ids, (0, 1), value=int(ids[0, 0]))  # (b, l + 1)
            attn = torch.nn.functional.pad(attn, (0, 1))  # (b, l + 1)
            keep = torch.nn.functional.pad(attn[:, :-1], (1, 0)).bool()  # (b, l + 1): token t-1 real
        else:
            keep = attn.bool()  # (b, l)
        scores = score(ids.to(device), attn.to(device))  # (b, l')
        if not m.pad:
            out[m.rows, : scores.shape[1]] = torch.where(keep, scores.cpu(), 0.0).float()  # (b, l')
    return out
