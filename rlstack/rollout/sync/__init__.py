"""Weight sync learner → rollout engines: one `WeightSyncBackend` per transport.

- `object_store` (rollout.sync.object_store): buckets of safetensors bytes through Ray's object store;
  CPU and multi-node.
- `nccl` (rollout.sync.nccl): buckets broadcast over a private NCCL group from the learner's rank 0; GPUs.
- `gloo` (rollout.sync.nccl too): the same broadcast over a gloo group and CPU tensors; CPU.

The broadcast backends push from the learner's rank 0 (`LearnerGroup.attach_weight_sync` hands it the
picklable backend, `LearnerGroup.push_weights` pushes), so weights skip the driver.

Both push only the units that changed since the last push, in buckets of at most `bucket_mb`, and report
bytes sent / skipped, buckets and seconds (rollout.sync.plan, rollout.sync.base). The engine side is
rollout.weight_sync.WorkerExtension.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rlstack.rollout.sync.base import WeightSyncBackend
from rlstack.rollout.sync.plan import checkpoint_tensors

__all__ = ["WeightSyncBackend", "checkpoint_tensors", "make_backend"]


def make_backend(
    kind: str,
    workers: list[Any],
    bucket_mb: float,
    changed_only: bool = True,
    known: Mapping[str, tuple[int, ...]] | None = None,
) -> WeightSyncBackend:
    if kind == "object_store":
        from rlstack.rollout.sync.object_store import ObjectStoreBackend

        return ObjectStoreBackend(workers, bucket_mb, changed_only, known)
    if kind in ("nccl", "gloo"):
        from rlstack.rollout.sync.nccl import BroadcastBackend

        return BroadcastBackend(workers, bucket_mb, changed_only, known, transport=kind)
    raise ValueError(f"unknown rollout.weight_sync {kind!r}; expected 'object_store', 'nccl' or 'gloo'")
