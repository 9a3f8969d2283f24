"""Any Hugging Face causal LM as the policy: loading through the Auto classes, the architecture check, and the
names a learner's weights carry on disk and in vLLM.

The learner trains the model class transformers builds for a checkpoint (Llama, Qwen2/Qwen3, Qwen3-MoE,
Mixtral, rlstack's Step3p5, ...); the rollout engines run vLLM's implementation of the same architecture. The
two meet at the checkpoint's tensor names: transformers >= 5 may hold some tensors fused in memory (a MoE
layer's experts as one (E, 2I, H) `gate_up_proj`) and converts them on load and save, so
`checkpoint_state` applies transformers' own reverse conversion before weights go to disk or to an engine,
whose `load_weights` takes checkpoint names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture transformers or vLLM cannot run (the message names which)."""


def architecture_of(path: str | Path) -> str:
    """The first entry of `architectures` in the checkpoint's config.json."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise UnsupportedModelError(f"{path}: no config.json, so not a Hugging Face checkpoint directory")
    config = json.loads(config_file.read_text())
    archs = config.get("architectures") or []
    if not archs:
        raise UnsupportedModelError(
            f"{config_file}: no 'architectures' entry, so neither transformers nor vLLM knows which model "
            f'class to build (model_type {config.get("model_type")!r}); add e.g. "architectures": '
            '["LlamaForCausalLM"]'
        )
    return str(archs[0])


@cache
def vllm_architectures() -> frozenset[str]:
    """Model classes this vLLM install can serve: the keys of the architecture tables in vLLM's model
    registry, read from its source (importing vLLM's registry takes ~8 s; parsing it, milliseconds)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError("vLLM is not installed (the rollout engine): run scripts/setup.sh")
    registry = Path(next(iter(spec.submodule_search_locations))) / "model_executor" / "models" / "registry.py"
    names = set()
    for node in ast.walk(ast.parse(registry.read_text())):
        if not isinstance(node, ast.Dict):
            continue
        for key, value in zip(node.keys, node.values, strict=True):
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and isinstance(value, ast.Tuple):
                names.add(key.value)
    if not names:
        raise UnsupportedModelError(f"{registry}: no architecture table found (an unknown vLLM layout)")
    return frozenset(names)


def check_architecture(path: str | Path, *, engine: bool = True) -> str:
    """The checkpoint's architecture if the learner (transformers) and, with `engine`, the rollout engine
    (vLLM) both implement it; else an `UnsupportedModelError` naming it and what is missing."""
    import transformers

    import rlstack.model  # noqa: F401  (registers Step3p5 with the Auto classes)

    arch = architecture_of(path)
    missing = []
    if not arch.endswith("ForCausalLM"):
        missing.append("a causal LM head (the architecture must be a ...ForCausalLM)")
    elif arch != "Step3p5ForCausalLM" and not hasattr(transformers, arch):
        missing.append(f"transformers {transformers.__version__} has no {arch} (the learner's model class)")
    if engine and arch not in vllm_architectures():
        missing.append(f"the installed vLLM cannot serve {arch} (the rollout engine)")
    if missing:
        raise UnsupportedModelError(f"{path}: architecture {arch} is not supported: " + "; ".join(missing))
    return arch


def replay_support(path: str | Path) -> str | None:
    """None if the learner can replay the checkpoint's MoE routing (Step3p5 with MoE layers, or a
    transformers MoE class whose router `router_hooks` reproduces); else what the policy lacks."""
    from rlstack.model.router_hooks import HOOKED_MODEL_TYPES

    config = json.loads((Path(path) / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type == "step3p5":
        enum = config.get("moe_layers_enum")
        dense = enum is not None and not str(enum).strip()
        return "has no MoE layers (a dense model)" if dense else None
    if model_type in HOOKED_MODEL_TYPES:
        return None
    return f"is a {model_type} model: routing replay supports Step3p5, {', '.join(HOOKED_MODEL_TYPES)}"


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """The checkpoint at `path` as transformers' causal-LM class for it, in `dtype`, in train mode."""
    from transformers import AutoModelForCausalLM

    import rlstack.model  # noqa: F401  (registers Step3p5 with the Auto classes)
    from rlstack.model.router_hooks import attach_router_hooks

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    attach_router_hooks(model)
    model.train()
    return model


def moe_block_classes(model: nn.Module) -> list[type[nn.Module]]:
    """The module classes that hold a MoE layer's experts: ZeRO-3 must gather each such block whole, since
    its forward indexes the experts' (packed) weights directly and runs only the experts it picked, so
    parameter-by-parameter hooks would leave ranks waiting on different gathers."""
    from rlstack.model.modeling import Step3p5MoE

    classes: dict[type[nn.Module], None] = {}
    for module in model.modules():
        if isinstance(module, Step3p5MoE) or isinstance(getattr(module, "experts", None), nn.Module):
            classes[type(module)] = None
    return list(classes)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (the model itself when there is none)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def checkpoint_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the model's `state_dict` names, e.g. a full-state gather) under the checkpoint's tensor names,
    those vLLM's `load_weights` takes: transformers' load-time conversions reverted (fused experts split per
    expert), and tied copies dropped (an LM head tied to the embedding is not a tensor of its own on disk)."""
    from transformers.core_model_loading import revert_weight_conversion

    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    kept = {k: v for k, v in state.items() if k not in tied}
    return dict(revert_weight_conversion(model, kept))  # type: ignore[arg-type]


def moe_layer_ids(model: nn.Module) -> tuple[int, ...]:
    """Decoder-layer indices of the MoE layers whose routing the model reports (Step3p5's own, or the hooked
    routers of a transformers MoE model); empty for a dense model."""
    from rlstack.model.router_hooks import hooked_moe_layer_ids

    inner = base_model(model)
    return tuple(getattr(inner.config, "moe_layer_ids", ())) or hooked_moe_layer_ids(inner)


def trunk_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (its `base_model_prefix` child: `model` for every architecture
    here), the part a value head sits on."""
    prefix = getattr(model, "base_model_prefix", "model")
    trunk = getattr(model, prefix, None)
    if not isinstance(trunk, nn.Module):
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder stack at .{prefix}")
    return trunk


def last_hidden_state(trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Any:
    """(B, T) ids -> (B, T, H) hidden states after the final norm, from any architecture's decoder stack."""
    out = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state
