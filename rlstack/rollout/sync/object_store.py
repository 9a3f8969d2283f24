"""The `object_store` backend: each bucket as safetensors bytes through Ray's object store.

Works on CPU and across machines. A bucket is serialised once and `ray.put` once; every engine loads the
same object, and the object is released before the next bucket is made.
"""

from __future__ import annotations

from collections.abc import Mapping

import ray
import torch

from rlstack.rollout.sync.base import WeightSyncBackend
from rlstack.rollout.sync.plan import Bucket
from rlstack.rollout.weight_sync import serialize_state_dict


class ObjectStoreBackend(WeightSyncBackend):
    name = "object_store"

    def _send_bucket(self, bucket: Bucket, state_dict: Mapping[str, torch.Tensor]) -> None:
        ref = ray.put(serialize_state_dict({name: state_dict[name] for name in bucket.names}))
        try:
            ray.get([w.load_bucket.remote(ref) for w in self.workers])
        finally:
            del ref
