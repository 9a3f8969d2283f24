"""The `object_store` backend: each bucket as safetensors bytes through Ray's object store.

Works on CPU and across machines. A bucket is serialised once and `ray.put` once; every engine loads the
same object (`WorkerExtension.rlstack_load_bucket`), and the object is released before the next bucket is
made.
"""

from __future__ import annotations

from collections.abc import Mapping

import ray
import torch
from safetensors.torch import save as save_safetensors

from rlstack.rollout.sync.backend import WeightSyncBackend
from rlstack.rollout.sync.plan import Bucket


class ObjectStoreBackend(WeightSyncBackend):
    name = "object_store"

    def _send_bucket(self, bucket: Bucket, state_dict: Mapping[str, torch.Tensor]) -> None:
        ref = ray.put(serialize_state_dict({name: state_dict[name] for name in bucket.names}))
        try:
            self._get([w.load_bucket.remote(ref) for w in self.workers])
        finally:
            del ref


def serialize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Contiguous CPU copies → safetensors bytes (picklable, one Ray object shared by every engine)."""
    return save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()})
