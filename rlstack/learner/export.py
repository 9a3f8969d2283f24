"""Full-state gathers of a (ZeRO-sharded) engine: the policy's weights for export and weight pushes, the
critic's for tests, and the broadcast check of a process group created after training."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


@torch.no_grad()
def full_state(
    engine: Any, zero_stage: int, rank: int, on_device: bool = False
) -> dict[str, torch.Tensor] | None:
    """The engine's full fp32 state dict on rank 0 (None elsewhere): copies on the CPU, or on this rank's
    device with `on_device`. Collective under ZeRO-3."""
    module = engine.module
    if zero_stage != 3:
        if rank != 0:
            return None
        return {k: copy_out(v, on_device) for k, v in module.state_dict().items()}
    import deepspeed

    gathered: dict[str, torch.Tensor] = {}
    for prefix, mod in module.named_modules():
        named = list(mod.named_parameters(prefix=prefix, recurse=False))
        if not named:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            if rank == 0:
                gathered |= {name: copy_out(p, on_device) for name, p in named}
    if rank != 0:
        return None
    # state_dict order and names; parameters come from the gather, buffers are never partitioned
    return {
        k: gathered[k] if k in gathered else copy_out(v, on_device) for k, v in module.state_dict().items()
    }


def broadcast_checksum(
    weights: dict[str, torch.Tensor] | None, world_size: int, device: torch.device
) -> float:
    """Broadcast rank 0's `weights` (None elsewhere) to every rank over a process group created now;
    return a checksum of what this rank holds. Completes promptly unless process-group set-up is broken
    (the DeepSpeed >= 0.17.3 device_id hang, see `engine`)."""
    group = dist.new_group(ranks=list(range(world_size)))
    try:
        meta = [None if weights is None else [(k, tuple(v.shape)) for k, v in weights.items()]]
        dist.broadcast_object_list(meta, src=0, group=group)
        total = 0.0
        for name, shape in meta[0]:  # type: ignore[union-attr]
            t = weights[name] if weights is not None else torch.empty(shape, dtype=torch.float32)
            t = t.to(device)
            dist.broadcast(t, src=0, group=group)
            total += float(t.double().sum())
        dist.barrier(group=group)
        return total
    finally:
        dist.destroy_process_group(group)


def copy_out(t: torch.Tensor, on_device: bool = False) -> torch.Tensor:
    """A detached fp32 (if floating) copy of `t`, contiguous, on the CPU or (`on_device`) where `t` is."""
    t = t.detach()
    t = t.float() if t.is_floating_point() else t
    return (t if on_device else t.cpu()).clone().contiguous()
