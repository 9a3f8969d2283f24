"""Sequence packing for the learner's scoring forward: no compute on padding.

A micro-batch arrives as right-padded rows (B, T). `pack` lays its sequences end to end into P <= B rows of
the same length T (first-fit decreasing), each sequence's positions restarting at 0: transformers' packed
format (`position_ids` given, no attention mask), in which each token attends only to its own sequence. Our
Step3p5 and transformers' models (sdpa/eager masks, flash-attention varlen) all read it. Attention cost per
row stays at most T^2 (rows are no longer than before); the MLP/MoE/LM-head work, which dominates, drops to
the real tokens plus the few padded ones at row ends.

`PackedRows.unpack` maps per-position outputs back to the (B, T) layout, keeping their gradient. A
sequence's first position scores nothing in the unpacked layout either (position 0 of each row is 0 there),
so the packed row's cross-sequence prediction at a sequence start is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedRows:
    """B right-padded rows packed into P rows of length T."""

    input_ids: torch.Tensor  # (P, T)
    position_ids: torch.Tensor  # (P, T) restarting at 0 per sequence; row-end padding is one more sequence
    token_mask: torch.Tensor  # (P, T) bool, real tokens
    index: torch.Tensor  # (B, T) long: flat position in P * T of each real token, -1 on padding

    def unpack(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(P, T, ...) per-position values -> (B, T, ...); `fill` on padding (differentiable)."""
        P, T = self.input_ids.shape
        flat = values.reshape(P * T, *values.shape[2:])  # (P*T, ...)
        out = flat[self.index.clamp(min=0)]  # (B, T, ...)
        keep = (self.index >= 0).view(*self.index.shape, *([1] * (values.dim() - 2)))
        return torch.where(keep, out, torch.as_tensor(fill, dtype=out.dtype, device=out.device))

    def unpack_scores(self, values: torch.Tensor) -> torch.Tensor:
        """`unpack` for next-token quantities (position t scores token t from position t - 1): 0 at each
        sequence's first token, as in the unpacked layout."""
        out = self.unpack(values)  # (B, T, ...)
        return torch.cat([torch.zeros_like(out[:, :1]), out[:, 1:]], dim=1)

    def pack(self, values: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """(B, T, ...) per-token values -> (P, T, ...) in the packed layout, `fill` elsewhere."""
        P, T = self.input_ids.shape
        out = torch.full((P * T, *values.shape[2:]), fill, dtype=values.dtype, device=values.device)
        real = self.index >= 0  # (B, T)
        out[self.index[real]] = values[real]
        return out.view(P, T, *values.shape[2:])


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of row indices whose lengths sum to at most `capacity` (every length <= capacity), filled
    longest first, each into the first bin with room. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int = 0) -> PackedRows:
    """Pack right-padded rows (B, T) (see the module docstring). Raises ValueError on a row whose real tokens
    are not a prefix (left padding, holes): those cannot be laid end to end without changing positions."""
    B, T = input_ids.shape
    mask = attention_mask.bool()  # (B, T)
    lengths = mask.sum(-1)  # (B,)
    prefix = torch.arange(T, device=mask.device)[None, :] < lengths[:, None]  # (B, T)
    if not torch.equal(mask, prefix):
        bad = int((mask != prefix).any(-1).nonzero()[0])
        raise ValueError(f"packing needs right-padded rows; row {bad}'s real tokens are not a prefix")
    bins = first_fit_decreasing(lengths.tolist(), T)
    P = len(bins)
    packed_ids = torch.full((P, T), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    position_ids = torch.zeros((P, T), dtype=torch.long, device=input_ids.device)
    token_mask = torch.zeros((P, T), dtype=torch.bool, device=input_ids.device)
    index = torch.full((B, T), -1, dtype=torch.long, device=input_ids.device)
    for p, rows in enumerate(bins):
        at = 0
        for r in rows:
            n = int(lengths[r])
            packed_ids[p, at : at + n] = input_ids[r, :n]
            position_ids[p, at : at + n] = torch.arange(n, device=position_ids.device)
            token_mask[p, at : at + n] = True
            index[r, :n] = p * T + at + torch.arange(n, device=index.device)
            at += n
        # row-end padding: a sequence of its own
        position_ids[p, at:] = torch.arange(T - at, device=position_ids.device)
    return PackedRows(packed_ids, position_ids, token_mask, index)
