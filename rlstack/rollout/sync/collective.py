"""torch.distributed pieces shared by the broadcast sender (rollout.sync.broadcast) and the engines
(rollout.sync.worker_extension): a private process group per transport, and packed bucket buffers.

The group is made from a TCPStore and a `ProcessGroupNCCL` / `ProcessGroupGloo` object directly, never
through `torch.distributed.init_process_group`, so it does not touch the default group that vLLM (or
DeepSpeed) already initialised in the same process. Rank 0 is the sender (the learner's rank 0); each vLLM
worker joins as `rank_offset + its rank inside its engine`.

A bucket travels as one flat uint8 buffer: every tensor's bytes at its 64-byte-aligned offset
(`plan_buckets(..., align=True)`), so a receiver views it back into tensors without a copy.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import torch
import torch.distributed as dist

from rlstack.rollout.sync.plan import Bucket, TensorMeta, dtype_of

TRANSPORTS = ("nccl", "gloo")
_PREFIX = "rlstack-weight-sync"


def check_transport(transport: str) -> None:
    """Fail early, naming the problem, where a transport cannot work in this process."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown broadcast transport {transport!r}; expected one of {TRANSPORTS}")
    if transport == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise RuntimeError(
            "weight_sync='nccl' needs CUDA GPUs and an NCCL build of torch in every process that sends or "
            f"receives weights; this process has torch {torch.__version__} with "
            f"cuda_available={torch.cuda.is_available()}, nccl_available={dist.is_nccl_available()}. "
            "Use rollout.weight_sync='object_store' on CPU."
        )


def transport_device(transport: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if transport == "nccl" else torch.device("cpu")


def create_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store on a free port (read it back from `store.port`)."""
    return dist.TCPStore(
        host, 0, world_size, is_master=True, timeout=_timeout(timeout_s), wait_for_workers=False
    )


def join_group(
    store_or_host: dist.Store | str,
    port: int,
    rank: int,
    world_size: int,
    transport: str,
    timeout_s: float,
) -> dist.ProcessGroup:
    """Join (rank > 0: connect to rank 0's store at host:port) and build the private process group."""
    check_transport(transport)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a weight-sync group of {world_size}")
    store = store_or_host
    if isinstance(store_or_host, str):
        store = dist.TCPStore(store_or_host, port, world_size, is_master=False, timeout=_timeout(timeout_s))
    store = dist.PrefixStore(_PREFIX, store)  # type: ignore[arg-type]
    # The returns are c10d Backends, which have ProcessGroup's broadcast(tensor, root) and shutdown() at run
    # time; torch's stubs declare neither on Backend, hence the two ignores.
    if transport == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, _timeout(timeout_s))  # type: ignore[return-value]
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = _timeout(timeout_s)
    return dist.ProcessGroupNCCL(store, rank, world_size, options)  # type: ignore[return-value]


def broadcast(group: dist.ProcessGroup, buffer: torch.Tensor) -> None:
    """Rank 0 sends `buffer`; every other rank receives into its own `buffer` (same size and dtype)."""
    group.broadcast(buffer, 0).wait()
    if buffer.is_cuda:
        torch.cuda.current_stream().synchronize()


def pack(state_dict: Mapping[str, torch.Tensor], bucket: Bucket, device: torch.device) -> torch.Tensor:
    """One uint8 buffer holding the bucket's tensors at their offsets (plan the bucket with align=True)."""
    buffer = torch.zeros(bucket.packed_nbytes, dtype=torch.uint8, device=device)
    for meta in bucket.tensors:
        tensor = state_dict[meta.name].detach()
        if tuple(tensor.shape) != meta.shape or str(tensor.dtype) != f"torch.{meta.dtype}":
            got = f"{tensor.dtype}{tuple(tensor.shape)}"
            raise ValueError(f"tensor {meta.name!r} is {got}, planned as {meta}")
        if meta.nbytes:
            flat = tensor.contiguous().reshape(-1).view(torch.uint8)
            buffer[meta.offset : meta.offset + meta.nbytes].copy_(flat, non_blocking=True)
    return buffer


def unpack(buffer: torch.Tensor, bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """Views of `buffer` as the bucket's tensors (no copy)."""
    out = []
    for meta in bucket.tensors:
        raw = buffer[meta.offset : meta.offset + meta.nbytes]
        out.append((meta.name, raw.view(dtype_of(meta.dtype)).view(meta.shape)))
    return out


def bucket_to_wire(bucket: Bucket) -> list[list]:
    """Plain lists (vLLM's RPC to a spawned engine core serialises arguments with msgpack)."""
    return [[t.name, t.dtype, list(t.shape), t.offset] for t in bucket.tensors]


def bucket_from_wire(rows: list[list]) -> Bucket:
    return Bucket(tuple(TensorMeta(str(n), str(d), tuple(map(int, s)), int(o)) for n, d, s, o in rows))


def _timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)
