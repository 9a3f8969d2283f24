"""The frozen reference policy of the KL term (`algorithm.kl_coef > 0`), partitioned like the policy.

Under ZeRO-3 the reference is a DeepSpeed engine without an optimizer: its parameters are sharded over the
learner ranks and gathered layer by layer in each forward, exactly like the policy's, so it costs each rank
1 / world_size of a model. Under ZeRO 0-2 the policy's parameters are replicated on every rank, and so are
the reference's: a plain module in eval mode with gradients off. Its forward is collective under ZeRO-3,
like the policy's: every rank scores the same number of micro-batches (`step.padded_micro_batches`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlstack.learner.config import LearnerConfig


def frozen_reference(path: Path, cfg: LearnerConfig, device: torch.device, dtype: torch.dtype) -> Any:
    """The checkpoint at `path` as a frozen reference for this rank (DeepSpeed must be initialised)."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from rlstack.model.auto import load_causal_lm, moe_block_classes

    model = load_causal_lm(path, dtype)
    model.requires_grad_(False)
    model.eval()
    # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), which types it as the unbound
    # nn.Module.to (a module first); the call is the ordinary bound one.
    model = model.to(device)  # type: ignore[arg-type]
    if cfg.zero_stage != 3:
        return model
    # a MoE block indexes its packed expert weights directly: ZeRO-3 gathers it whole (as the policy's)
    if blocks := moe_block_classes(model):
        set_z3_leaf_modules(model, blocks)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": int(2e7)},
        "steps_per_print": 2**31 - 1,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def shard_numel(model: Any) -> dict[str, int]:
    """Parameter elements held on this rank (`local`) and in the whole model (`full`). Under ZeRO-3 a
    parameter is an empty placeholder and this rank's shard is its `ds_tensor`."""
    params = list(model.parameters())
    local = sum(int(getattr(p, "ds_tensor", p).numel()) for p in params)
    full = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    return {"local": local, "full": full}
