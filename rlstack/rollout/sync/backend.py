"""`WeightSyncBackend`: one push of a state dict into every rollout engine, whatever the transport.

A push plans (digests → changed units → buckets, rollout.sync.plan), then runs begin → each bucket →
finish on every worker, one bucket in flight at a time, so the extra memory a push needs is one bucket
(plus the engine rebuilding one module), not a copy of the model. Backends differ only in how one bucket
reaches the engines (`_send_bucket`). A push that fails part-way forgets the digests, so the next one
sends everything again (the engines may hold half of the failed push).

Workers are `RolloutWorker` / `AsyncRolloutWorker` Ray actors: `begin_update`, `finish_update(version)`,
`set_version(version)` and the backend's own bucket method (rollout.sync.engine_rpc).
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import ray
import torch

from rlstack.rollout.sync.plan import Bucket, ChangeTracker, PushPlan


class WeightSyncBackend(ABC):
    name: ClassVar[str]
    align: ClassVar[bool] = False
    """Whether buckets need packed-buffer offsets (broadcast backends)."""
    pushes_from_learner: ClassVar[bool] = False
    """Whether `push` runs in the learner's rank-0 process (broadcast: it is rank 0 of the group), rather
    than in the driver (rollout.sync.push)."""

    def __init__(
        self,
        workers: list[Any],
        bucket_mb: float = 64.0,
        changed_only: bool = True,
        known: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        """`known`: the engines' checkpoint tensors (name → shape, `plan.checkpoint_tensors`), to refuse
        unknown names and wrong shapes before sending."""
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.workers = list(workers)
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.tracker = ChangeTracker(changed_only, known)
        self.timeout_s: float | None = None
        """Deadline of each remote step of a push (begin, a bucket, finish): a hung engine fails the push
        with ray's GetTimeoutError instead of stalling it (the rollout group sets it from `faults:`)."""

    def push(self, state_dict: Mapping[str, torch.Tensor], version: int) -> dict[str, float]:
        """Send what changed since the last push to every engine and set their weights version."""
        start = time.perf_counter()
        plan = self.tracker.plan(state_dict, self.bucket_bytes, align=self.align)
        planned = time.perf_counter()
        if not plan.buckets:
            self._get([w.set_version.remote(version) for w in self.workers])
        else:
            try:
                self._get([w.begin_update.remote() for w in self.workers])
                for bucket in plan.buckets:
                    self._send_bucket(bucket, state_dict)
                self._get([w.finish_update.remote(version) for w in self.workers])
            except BaseException:
                self.tracker.reset()
                self._abort()
                raise
        self.tracker.commit(plan)
        return _metrics(plan, planned - start, time.perf_counter() - start)

    def _abort(self) -> None:
        """Best effort after a failed push: finish the reload (modules still waiting for tensors get their
        old ones back) so the engines can generate again; the push's own error is the one raised."""
        with contextlib.suppress(Exception):  # the engines are already broken; report the first error
            # briefly: a hung engine (the usual reason to be here) would only make the error wait
            ray.get([w.finish_update.remote(None) for w in self.workers], timeout=30.0)

    def _get(self, refs: list[Any]) -> list[Any]:
        """`ray.get` under the push's deadline (`timeout_s`)."""
        return ray.get(refs, timeout=self.timeout_s)

    def reset(self) -> None:
        """Forget what the engines hold: the next push sends everything (call it when anything else,
        such as another backend, changed the engines' weights)."""
        self.tracker.reset()

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release transport resources (process groups)."""

    @abstractmethod
    def _send_bucket(self, bucket: Bucket, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Deliver one bucket to every worker and return once all of them loaded it."""


def _metrics(plan: PushPlan, plan_s: float, total_s: float) -> dict[str, float]:
    sent = plan.bytes_sent
    return {
        "sync/bytes": float(sent),
        "sync/bytes_skipped": float(plan.bytes_skipped),
        "sync/buckets": float(len(plan.buckets)),
        "sync/max_bucket_mb": max((b.nbytes for b in plan.buckets), default=0) / 2**20,
        "sync/units_sent": float(plan.units_sent),
        "sync/units_skipped": float(plan.units_skipped),
        "sync/plan_seconds": plan_s,
        "sync/seconds": total_s,
        "sync/mb_per_s": sent / 2**20 / max(total_s, 1e-9),
    }
