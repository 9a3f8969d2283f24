"""Data-parallel ranks as threads of one process, for the learner's unit tests: an all-reduce between them
(`ThreadGroup`) and a runner that surfaces any rank's failure (`run_on_ranks`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class ThreadGroup:
    """All-reduce between threads of one process: each rank deposits, waits, reads the total."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.slots: list[torch.Tensor | None] = [None] * world_size

    def rank(self, r: int) -> RankReducer:
        return RankReducer(self, r)


class RankReducer:
    """One rank's view of a `ThreadGroup` (rlstack.learner.step's `Reducer` protocol)."""

    def __init__(self, group: ThreadGroup, r: int) -> None:
        self.group, self.r, self.world_size = group, r, group.world_size

    def _reduce(self, t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        self.group.slots[self.r] = t.clone()
        self.group.barrier.wait()
        result = fn(torch.stack(self.group.slots))  # type: ignore[arg-type]
        self.group.barrier.wait()  # nobody overwrites a slot before everyone has read
        return t.copy_(result)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, lambda s: s.sum(0))

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, lambda s: s.max(0).values)


def run_on_ranks(world_size: int, rank_main: Callable[[int, RankReducer], T]) -> list[T]:
    """`rank_main(r, reducer)` on `world_size` threads at once; their results in rank order. A rank that
    raises breaks the others' barriers and fails the test with its error."""
    group = ThreadGroup(world_size)
    results: list[T | None] = [None] * world_size
    errors: list[BaseException] = []

    def main(r: int) -> None:
        try:
            results[r] = rank_main(r, group.rank(r))
        except BaseException as e:  # surface thread failures in the test
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results  # type: ignore[return-value]
