"""How a learner rank cuts its rows into micro-batches: a fixed number of rows, or a token budget.

With a token budget (`learner.micro_batch_tokens`, verl's "dynamic batch size") the rows are binned
first-fit decreasing by their real token count, so every micro-batch holds about the same number of tokens:
many short responses share one forward, a long one gets a forward of its own, and a batch's compute follows
its tokens, not its row count times the longest row. The loss is normalised by the whole mini-batch
(`step.global_normalizer`), so any cut gives the same update up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlstack.learner.batch import PolicyBatch


@dataclass(frozen=True)
class MicroSplit:
    """`rows` per micro-batch, or, with `tokens`, as many rows as fit `tokens` real tokens (a longer row
    alone)."""

    rows: int = 8
    tokens: int | None = None

    def __post_init__(self) -> None:
        if self.rows < 1 or (self.tokens is not None and self.tokens < 1):
            raise ValueError(f"a micro-batch needs at least 1 row and 1 token, got {self}")

    def plan(self, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Row indices (ascending) of each micro-batch for rows of these real token counts (B,)."""
        n = len(lengths)
        if self.tokens is None:
            return [torch.arange(i, min(i + self.rows, n)) for i in range(0, n, self.rows)]
        bins: list[list[int]] = []
        room: list[int] = []  # tokens each bin can still take
        for row in sorted(range(n), key=lambda r: -int(lengths[r])):  # longest first, stable
            size = int(lengths[row])
            fit = next((b for b, left in enumerate(room) if size <= left), None)
            if fit is None:
                bins.append([row])
                room.append(self.tokens - size)
            else:
                bins[fit].append(row)
                room[fit] -= size
        return [torch.tensor(sorted(b), dtype=torch.long) for b in bins]


def as_split(split: MicroSplit | int) -> MicroSplit:
    """A row count (what tests and benchmarks pass) as a split."""
    return split if isinstance(split, MicroSplit) else MicroSplit(rows=split)


@dataclass
class Micro:
    """One micro-batch and the shard rows it holds (b,); an inert pad holds none."""

    batch: PolicyBatch
    rows: torch.Tensor

    @property
    def pad(self) -> bool:
        return len(self.rows) == 0


def cut(shard: PolicyBatch, split: MicroSplit) -> list[Micro]:
    """The shard's micro-batches (none for an empty shard); contiguous rows are views, not copies."""
    out = []
    for rows in split.plan(shard.attention_mask.sum(-1)):
        contiguous = len(rows) > 0 and int(rows[-1] - rows[0]) == len(rows) - 1
        picked = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
        out.append(Micro(shard.select(picked), rows))
    return out
