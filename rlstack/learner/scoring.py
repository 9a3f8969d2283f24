"""Scoring one rank's rows without gradients: log-probs (pi_old), critic values; padded micro-batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlstack.learner.batch import PolicyBatch
from rlstack.learner.step import Reducer, padded_micro_batches

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, attn) (b, l) -> scores (b, l)


@torch.no_grad()
def score_rows(
    engine: Any,
    batch: PolicyBatch,
    score: Score,
    micro_batch_size: int,
    reducer: Reducer,
    device: torch.device,
    state_after_last: bool = False,
) -> torch.Tensor:
    """`score(ids, attn) -> (b, l)` over micro-batches of `batch` (padded with inert ones to the largest
    count of any rank, for ZeRO-3's collectives), 0 on padding, back at length L. With `state_after_last`
    one padding column is appended first, so position n_b (scored from the hidden state of the last real
    token) is kept too: (B, L + 1). Collective under ZeRO-3."""
    engine.eval()
    n_real = len(batch.chunks(micro_batch_size))
    width = batch.seq_len + int(state_after_last)
    out = []
    for i, mb in enumerate(padded_micro_batches(batch, micro_batch_size, reducer)):
        mb = mb.trim()
        ids, attn = mb.input_ids, mb.attention_mask  # (b, l)
        if state_after_last:
            ids = torch.nn.functional.pad(ids, (0, 1), value=int(ids[0, 0]))  # (b, l + 1)
            attn = torch.nn.functional.pad(attn, (0, 1))  # (b, l + 1)
            keep = torch.nn.functional.pad(attn[:, :-1], (1, 0)).bool()  # (b, l + 1): token t-1 real
        else:
            keep = attn.bool()  # (b, l)
        scores = score(ids.to(device), attn.to(device))  # (b, l')
        if i < n_real:
            scores = torch.where(keep, scores.cpu(), 0.0).float()  # (b, l')
            out.append(torch.nn.functional.pad(scores, (0, width - scores.shape[1])))
    return torch.cat(out)
