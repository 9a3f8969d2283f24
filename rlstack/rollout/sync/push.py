"""The transport, chosen from `rollout.weight_sync`, and the one call that pushes a learner's new policy.

`make_backend` builds the `WeightSyncBackend` a `RolloutGroup` holds (`object_store`, or a broadcast over
`nccl` / `gloo`). The backend says where its pushes run (`pushes_from_learner`): `attach` hands a
broadcast backend to the learner's rank 0 once, and `push_policy` then takes the new weights either
learner → driver → object store → engines, or broadcasts them from the learner's rank 0 straight into the
engines. The driver calls only these two.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rlstack.rollout.sync.backend import WeightSyncBackend

if TYPE_CHECKING:
    from rlstack.learner.group import LearnerGroup
    from rlstack.rollout.group import RolloutGroup


def make_backend(
    kind: str,
    workers: list[Any],
    bucket_mb: float,
    changed_only: bool = True,
    known: Mapping[str, tuple[int, ...]] | None = None,
) -> WeightSyncBackend:
    """The backend for `rollout.weight_sync` = `kind`, pushing into `workers` (rollout worker actors)."""
    if kind == "object_store":
        from rlstack.rollout.sync.object_store import ObjectStoreBackend

        return ObjectStoreBackend(workers, bucket_mb, changed_only, known)
    if kind in ("nccl", "gloo"):
        from rlstack.rollout.sync.broadcast import BroadcastBackend

        return BroadcastBackend(workers, bucket_mb, changed_only, known, transport=kind)
    raise ValueError(f"unknown rollout.weight_sync {kind!r}; expected 'object_store', 'nccl' or 'gloo'")


def attach(learner: LearnerGroup, rollout: RolloutGroup) -> None:
    """Give the learner's rank 0 the rollout group's backend when pushes run there (broadcast)."""
    if rollout.weight_sync.pushes_from_learner:
        learner.attach_weight_sync(rollout.weight_sync)


def push_policy(learner: LearnerGroup, rollout: RolloutGroup) -> dict[str, float]:
    """Push the learner's current policy into every engine at the learner's version; returns the sync
    metrics (`sync/bytes`, `sync/buckets`, `sync/seconds`, `sync/total_seconds`, ...)."""
    version = learner.version
    if not rollout.weight_sync.pushes_from_learner:
        return rollout.update_weights(learner.export_weights(), version)
    start = time.perf_counter()
    stats = learner.push_weights(version)  # collective on the learner; rank 0 sends (after `attach`)
    rollout.version = version
    stats["sync/total_seconds"] = time.perf_counter() - start
    return stats
