"""Weight sync learner → rollout engines, all of it: one `WeightSyncBackend` per transport, the engine side,
and the rollout workers' methods between them.

Modules (each imports only those above it in this list; none imports this package's exports):
- `plan`: which units changed since the last push, and how they pack into buckets (pure torch).
- `collective`: a private process group per transport (nccl / gloo) and packed bucket buffers.
- `backend`: `WeightSyncBackend`, one push: plan, then begin → buckets → finish on every engine.
- `object_store`: buckets of safetensors bytes through Ray's object store; CPU and multi-node.
- `broadcast`: buckets broadcast from the learner's rank 0 over NCCL (GPUs) or gloo (CPU).
- `push`: the backend from `rollout.weight_sync` (`make_backend`) and the driver's calls (`attach`,
  `push_policy`).
- `worker_extension`: `WorkerExtension`, mixed into vLLM's worker: loads buckets in place.
- `engine_rpc`: the rollout workers' Ray methods that forward to it (`EngineRPC`, `AsyncEngineRPC`).

Every push sends only the units that changed since the last one, in buckets of at most `bucket_mb`, and
reports bytes sent / skipped, buckets and seconds. Exports resolve lazily, so a vLLM worker importing
`worker_extension` does not import Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlstack.lazy import lazy_exports

_MODULE_OF = {
    "WeightSyncBackend": "backend",
    "checkpoint_tensors": "plan",
    "make_backend": "push",
    "attach": "push",
    "push_policy": "push",
}
__all__ = ["WeightSyncBackend", "attach", "checkpoint_tensors", "make_backend", "push_policy"]

if TYPE_CHECKING:
    from rlstack.rollout.sync.backend import WeightSyncBackend
    from rlstack.rollout.sync.plan import checkpoint_tensors
    from rlstack.rollout.sync.push import attach, make_backend, push_policy

__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF)
