"""The broadcast backends, `nccl` (GPUs) and `gloo` (CPU): buckets broadcast from the learner's rank 0 to
every vLLM worker.

As in verl / OpenRLHF: the sender (rank 0) and every vLLM worker (ranks 1..N, one per worker process of
each engine) build a private process group (rollout.sync.collective); per bucket the sender asks each
engine to receive (`collective_rpc` into `WorkerExtension.rlstack_receive_bucket`, which allocates the
packed buffer on its GPU, joins the broadcast and loads the tensors with vLLM's layerwise reload), then
broadcasts the packed bucket. Planning, changed-only and the begin/finish lifecycle are shared with the
object-store backend (rollout.sync.backend).

Where it runs: the process that calls `push` is rank 0, i.e. the learner's rank 0: the backend object is
picklable (the process group is made lazily, in the process that pushes), so `rollout.sync.push.attach`
hands `RolloutGroup.weight_sync` to the learner (`LearnerGroup.attach_weight_sync`) and
`rollout.sync.push.push_policy` calls `LearnerGroup.push_weights`. The transports differ only in the
process group and the buffers' device (rollout.sync.collective): with NCCL, on CPU it refuses to start,
naming the problem (`check_transport`); `transport="gloo"` runs the very same path over CPU tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import ray
import torch

from rlstack.rollout.sync.backend import WeightSyncBackend
from rlstack.rollout.sync.collective import (
    TRANSPORTS,
    broadcast,
    bucket_to_wire,
    check_transport,
    create_store,
    join_group,
    pack,
    transport_device,
)
from rlstack.rollout.sync.plan import Bucket


class BroadcastBackend(WeightSyncBackend):
    name = "broadcast"
    align = True
    pushes_from_learner = True

    def __init__(
        self,
        workers: list[Any],
        bucket_mb: float = 64.0,
        changed_only: bool = True,
        known: Mapping[str, tuple[int, ...]] | None = None,
        transport: str = "nccl",
        host: str | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        super().__init__(workers, bucket_mb, changed_only, known)
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown broadcast transport {transport!r}; expected one of {TRANSPORTS}")
        self.transport = transport
        self.host = host
        self.timeout_s = timeout_s
        self._group: Any = None
        self._store: Any = None

    def connect(self) -> None:
        """Make the process group: this process is rank 0, engine e's workers are ranks offset_e + r."""
        check_transport(self.transport)
        host = self.host or ray.util.get_node_ip_address()
        sizes = self._get([w.engine_world_size.remote() for w in self.workers])
        world_size = 1 + sum(sizes)
        offsets = [1 + s for s in itertools.accumulate([0, *sizes[:-1]])]
        timeout = self.timeout_s or 300.0
        store = create_store(host, world_size, timeout)
        joined = [
            w.join_group.remote(host, store.port, offset, world_size, self.transport, timeout)
            for w, offset in zip(self.workers, offsets, strict=True)
        ]
        self._group = join_group(store, store.port, 0, world_size, self.transport, timeout)
        self._get(joined)
        self._store = store

    def push(self, state_dict: Mapping[str, torch.Tensor], version: int) -> dict[str, float]:
        if self._group is None:
            self.connect()
        return super().push(state_dict, version)

    def _send_bucket(self, bucket: Bucket, state_dict: Mapping[str, torch.Tensor]) -> None:
        receiving = [w.receive_bucket.remote(bucket_to_wire(bucket)) for w in self.workers]
        buffer = pack(state_dict, bucket, transport_device(self.transport))
        broadcast(self._group, buffer)
        del buffer
        self._get(receiving)

    def close(self) -> None:
        if self._group is None:
            return
        try:
            self._get([w.leave_group.remote() for w in self.workers])
        finally:
            if hasattr(self._group, "shutdown"):
                self._group.shutdown()
            self._group = self._store = None

    def __getstate__(self) -> dict[str, Any]:
        """Ship without the process group: it is made again in the process that pushes."""
        state = dict(self.__dict__)
        state["_group"] = state["_store"] = None
        return state
