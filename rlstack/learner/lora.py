"""LoRA on the policy (`learner.lora`), with PEFT: adapters train, the base weights stay frozen.

The rollout engines always serve MERGED weights (W + (alpha / r) * B @ A per adapted linear layer): the
learner's merge is exact arithmetic on the gathered state, works for every architecture vLLM serves, and
keeps the engine's log-probs those of the very weights the learner scores with. vLLM's own LoRA serving
would push only the adapters (about 1% of the bytes) but runs extra adapter kernels per token and keeps
the base and adapter apart at inference; worth it for large models on GPUs, not done here (docs/models.md).

Checkpoints hold the merged model at the top (what vLLM and `rlstack eval` load) and the adapter alone in
`adapter/` (PEFT's format: `PeftModel.from_pretrained(base, dir / "adapter")`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlstack.learner.config import LoRAConfig

PEFT_PREFIX = "base_model.model."
"""What PEFT's wrappers put in front of every name of the wrapped model."""
ADAPTER_DIR = "adapter"


def apply_lora(model: Any, cfg: LoRAConfig) -> Any:
    """`model` wrapped by PEFT with fresh adapters (B = 0, so the merged weights start equal to the base) on
    its linear layers; every base parameter frozen. Adapters on parameters that are not linear layers (a MoE
    block's fused experts or router, which PEFT targets through `target_parameters`) are refused: the merge
    here covers linear layers only."""
    from peft import LoraConfig, get_peft_model

    targets = linear_targets(model) if cfg.target_modules == "all-linear" else cfg.target_modules
    peft_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # PEFT annotates int; it computes alpha / r
        lora_dropout=cfg.dropout,
        target_modules=targets,
        exclude_modules=_step3p5_routers(model) or None,
        bias="none",
    )
    wrapped: Any = get_peft_model(model, peft_cfg)
    params = sorted(wrapped.peft_config["default"].target_parameters or [])
    if params:
        raise ValueError(
            f"learner.lora.target_modules = {cfg.target_modules}: PEFT maps these onto this MoE model's "
            f"fused expert / router parameters ({', '.join(params)}), which rlstack cannot merge into the "
            "engines' weights yet; target the attention and other linear layers only, e.g. [q_proj, k_proj, "
            "v_proj, o_proj], or use all-linear (routed experts then stay frozen)"
        )
    return wrapped


def linear_targets(model: Any) -> list[str]:
    """`all-linear`, resolved: the full names of every nn.Linear but the LM head and Step3p5's routers. (A
    transformers MoE block's experts and router are not nn.Linear, so they are not among them.)"""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = set(_step3p5_routers(model))
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and name not in skip
    ]


def _step3p5_routers(model: nn.Module) -> list[str]:
    """Step3p5's routers: nn.Linear modules whose weight the MoE block reads directly (their forward never
    runs), so an adapter there would be merged into the engines' weights yet never used by the learner."""
    from rlstack.model.modeling import Step3p5MoE

    return [f"{name}.gate" for name, m in model.named_modules() if isinstance(m, Step3p5MoE)]


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def lora_scaling(model: Any) -> float:
    """alpha / r of the model's (single, `default`) adapter."""
    cfg = model.peft_config["default"]
    return float(cfg.lora_alpha) / float(cfg.r)


def plain_name(name: str) -> str:
    """A PEFT model's parameter name under the plain model: PEFT's prefix and `.base_layer` dropped."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def merged_state(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A PEFT model's full state dict -> the plain model's, adapters merged: for each adapted layer
    `X.base_layer.weight` (out, in), `X.lora_A.default.weight` (r, in), `X.lora_B.default.weight` (out, r):
    `X.weight = W + scaling * B @ A`, computed in fp32 and returned in W's dtype. Names lose PEFT's prefix
    and `.base_layer`; adapter tensors are dropped."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        plain = plain_name(name)
        if name.endswith(".base_layer.weight"):
            layer = name.removesuffix(".base_layer.weight")
            a, b = state[f"{layer}.lora_A.default.weight"], state[f"{layer}.lora_B.default.weight"]
            delta = scaling * (b.float() @ a.float())  # (out, r) @ (r, in) -> (out, in)
            tensor = (tensor.float() + delta).to(tensor.dtype)
        out[plain] = tensor
    return out


def adapter_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of a PEFT model's full state dict (its names unchanged)."""
    return {k: v for k, v in state.items() if ".lora_" in k}


def save_adapter(model: nn.Module, state: Mapping[str, torch.Tensor], root: Path) -> None:
    """`root/adapter/`: PEFT's adapter config and weights, from the gathered full state `state`."""
    save: Any = model.save_pretrained
    save(str(root / ADAPTER_DIR), state_dict=adapter_state(state))
