"""Set-up of one learner rank: the process group, the DeepSpeed config and the ZeRO engines.

Process group: we create it ourselves with `torch.distributed.init_process_group` WITHOUT `device_id`
and only then call `deepspeed.init_distributed`, which adopts it. DeepSpeed >= 0.17.3 binds `device_id`
on CUDA, which has been reported to hang the weight sync that follows the first training step when
other process groups are created later (allenai/open-instruct#1311, deepspeedai/DeepSpeed#7266, #7542).
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rlstack.learner.config import LearnerConfig

PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)


def free_port() -> int:
    """A TCP port that is free on this host right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def resolve_backend(backend: str, cuda_available: bool) -> str:
    """`auto` -> nccl with CUDA, gloo without; an explicit choice is checked against the hardware."""
    if backend == "auto":
        return "nccl" if cuda_available else "gloo"
    if backend == "nccl" and not cuda_available:
        raise ValueError("learner.backend = 'nccl' needs a CUDA GPU per rank; use 'gloo' (or 'auto') on CPU")
    return backend


def learner_threads(cfg: LearnerConfig) -> int:
    """torch threads of one learner rank: `num_threads`, else its whole reserved CPUs (at least 1)."""
    return cfg.num_threads if cfg.num_threads is not None else max(1, math.floor(cfg.cpus_per_rank))


def model_dtype(cfg: LearnerConfig) -> torch.dtype:
    """The dtype the learner's models are held in (`learner.dtype`)."""
    return torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32


def deepspeed_config(cfg: LearnerConfig, lr: float | None = None, cuda: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg` (with learning rate `lr` instead of `cfg.lr`: the critic's).
    Accumulation is driven by the caller (boundaries set per micro-batch, `scale_wrt_gas=False`), so
    DeepSpeed's own accumulation count stays 1. `cuda`: whether the ranks run on GPUs (None: ask torch);
    optimizer offload moves state from GPU to host memory, so without GPUs there is nothing to offload."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer and cuda:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.zero_stage in (1, 2):
        # DeepSpeed's default buckets are 5e8 elements (2 GB of fp32 staging per rank): far more than we need.
        zero |= {"reduce_bucket_size": int(2e7), "allgather_bucket_size": int(2e7)}
    if cfg.zero_stage == 3:
        zero |= {"reduce_bucket_size": int(2e7), "stage3_prefetch_bucket_size": int(2e7)}
    # bf16 parameters: DeepSpeed keeps fp32 master weights in the (ZeRO) optimizer and casts the update back
    bf16 = {"bf16": {"enabled": True}} if cfg.dtype == "bfloat16" else {}
    return bf16 | {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr if lr is None else lr,
                "betas": list(cfg.betas),
                "eps": cfg.adam_eps,
                "weight_decay": cfg.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on norm weights and other vectors (empty groups dropped)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay == 0.0:
        return [{"params": params}]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class EngineSink:
    """Gradient accumulation through a DeepSpeed engine; the step owns the accumulation boundary."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def begin(self, is_last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(is_last)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)


def init_process_group(
    cfg: LearnerConfig, rank: int, world_size: int, master_addr: str, master_port: int
) -> torch.device:
    """Join the learner's process group (and DeepSpeed's adoption of it), set threads and seeds; returns
    this rank's device (cuda:0 under nccl: Ray shows each GPU actor one device; else the CPU)."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    backend = resolve_backend(cfg.backend, torch.cuda.is_available())
    os.environ |= {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        # Ray gives each GPU actor exactly one visible device; on CPU the index only names the rank.
        "LOCAL_RANK": "0" if backend == "nccl" else str(rank),
    }
    # Without LOCAL_SIZE DeepSpeed's CPU shared-memory all-reduce stays off: it is only used for
    # inference, and it leaves files in /dev/shm that nothing removes.
    os.environ.pop("LOCAL_SIZE", None)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    torch.set_num_threads(learner_threads(cfg))
    seed_everything(cfg.seed + rank)

    if not dist.is_initialized():
        # No device_id here on purpose: see the module docstring.
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=PROCESS_GROUP_TIMEOUT,
        )
    if backend != "nccl":
        check_build_lock()  # DeepSpeed loads (JIT-builds) its CPU shm op here
    deepspeed.init_distributed(dist_backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    return device


STALE_BUILD_LOCK_S = 300.0
"""A torch-extension build lock older than this is left by a killed process (a build takes about 60 s)."""


def check_build_lock() -> None:
    """DeepSpeed's shm op is loaded through torch's JIT builder, which waits, without a deadline, while its
    build directory's `lock` file exists; a process killed mid-check leaves one behind, and every later
    learner would hang. An old lock: fail now, naming it."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_BUILD_LOCK_S:
        raise RuntimeError(
            f"{lock} is {age:.0f} s old: left by a process killed while building DeepSpeed's shm op, and "
            "the build would wait for it forever. Delete it (no other process is building) and start again"
        )


def build_engine(model: torch.nn.Module, cfg: LearnerConfig, lr: float, device: torch.device) -> Any:
    """A ZeRO engine with its own AdamW (learning rate `lr`) over `model`, on `device`."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from rlstack.model.auto import moe_block_classes

    model = model.to(device)
    if cfg.zero_stage == 3 and (blocks := moe_block_classes(model)):
        # A MoE block indexes its packed expert weights directly and runs only the experts it picked, so
        # ZeRO-3 must gather the whole block at once.
        set_z3_leaf_modules(model, blocks)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.weight_decay),
        config=deepspeed_config(cfg, lr),
    )
    return engine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
