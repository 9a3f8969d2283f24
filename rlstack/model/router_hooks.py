"""Routing statistics and routing replay for transformers' own MoE models (Qwen2-MoE, Qwen3-MoE, Mixtral).

rlstack's Step3p5 reports its routing itself (`output_router_stats`, `routed_experts`). For transformers'
MoE classes the same two keywords are provided by forward hooks, so the learner treats every MoE policy
alike:

- a pre-hook on the model takes `output_router_stats`, `routed_experts` (B, T, n_moe_layers, k) and
  `routing_token_mask` (B, T) out of the call (the model never sees them) and keeps them, with the
  real-token mask (`routing_token_mask`, else the attention mask), for this forward;
- a hook on each router (a softmax top-k router returning `(logits, top-k weights, top-k ids)`) records a
  `RoutingStats` per layer and, with replay, swaps the router's ids for the replayed ones, taking their
  weights from the LIVE softmax (renormalised over the replayed set where the router renormalises), as
  Step3p5's replay does: the router keeps its gradient;
- a hook on the model attaches `router_stats`, `routing_confidence`, `expert_ids` and `expert_load` to the
  output, like `Step3p5Output`.

With activation checkpointing a layer's forward runs again in the backward pass; the replayed ids are kept
until the next forward, so the recompute routes exactly as the forward did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rlstack.model.modeling import RoutingStats

SOFTMAX_TOPK_ROUTERS = {
    # class name -> whether its top-k weights are renormalised (None: read `norm_topk_prob` off the module)
    "Qwen2MoeTopKRouter": None,
    "Qwen3MoeTopKRouter": None,
    "MixtralTopKRouter": True,
}
"""transformers router classes whose arithmetic the hooks reproduce: softmax over all experts, top-k,
optionally renormalised over the k. Other MoE classes train fine but report no routing statistics."""

HOOKED_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "mixtral")
"""config.json `model_type`s whose routers are among SOFTMAX_TOPK_ROUTERS (routing replay and statistics)."""

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class _ForwardState:
    """What the current forward asked for, shared by the model's and the routers' hooks."""

    routers: list[nn.Module]
    layer_ids: list[int]
    want_stats: bool = False
    replay: torch.Tensor | None = None  # (B*T, n_moe_layers, k) long, -1 = free
    token_mask: torch.Tensor | None = None  # (B*T,) bool
    stats: dict[int, RoutingStats] = field(default_factory=dict)


def attach_router_hooks(model: nn.Module) -> bool:
    """Give a transformers MoE model `output_router_stats` / `routed_experts` (see the module docstring);
    returns whether it has routers the hooks understand (False: nothing attached). Idempotent."""
    if getattr(model, "_rlstack_router_state", None) is not None:
        return True
    named = [(n, m) for n, m in model.named_modules() if type(m).__name__ in SOFTMAX_TOPK_ROUTERS]
    if not named:
        return False
    layer_ids: list[int] = []
    for name, _ in named:
        found = _LAYER.search(name)
        layer_ids.append(int(found.group(1)) if found else len(layer_ids))
    state = _ForwardState([m for _, m in named], layer_ids)
    for index, (_, router) in enumerate(named):
        router.register_forward_hook(_router_hook(state, index))
    model.register_forward_pre_hook(_begin(state), with_kwargs=True)
    model.register_forward_hook(_finish(state))
    model._rlstack_router_state = state  # type: ignore[assignment]
    return True


def hooked_moe_layer_ids(model: nn.Module) -> tuple[int, ...]:
    """Decoder-layer indices of the hooked routers, in order (empty without hooks)."""
    state = getattr(model, "_rlstack_router_state", None)
    return tuple(state.layer_ids) if state is not None else ()


def _begin(state: _ForwardState) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kwargs = dict(kwargs)
        state.want_stats = bool(kwargs.pop("output_router_stats", False))
        replay = kwargs.pop("routed_experts", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("routing statistics and replay need input_ids")
        B, T = ids.shape
        n_moe = len(state.routers)
        if replay is not None:
            k = int(getattr(state.routers[0], "top_k", replay.shape[-1]))
            if tuple(replay.shape) != (B, T, n_moe, k):
                raise ValueError(
                    f"routed_experts has shape {tuple(replay.shape)}; expected (B, T, n_moe_layers, top_k) "
                    f"= {(B, T, n_moe, k)}"
                )
            replay = replay.reshape(B * T, n_moe, k).long()
        state.replay = replay
        mask = kwargs.pop("routing_token_mask", None)  # packed rows (attention_mask None): the real tokens
        if mask is None:
            mask = kwargs.get("attention_mask")
        state.token_mask = mask[:, -T:].reshape(-1).bool() if mask is not None else None
        state.stats = {}
        return args, kwargs

    return hook


def _router_hook(state: _ForwardState, index: int) -> Any:
    def hook(router: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if not (state.want_stats or state.replay is not None):
            return None
        logits, weights, free_ids = output  # (N, E), (N, k), (N, k)
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        ids = free_ids
        if state.replay is not None:
            replay = state.replay[:, index].to(free_ids.device)  # (N, k)
            ids = torch.where(replay[:, :1] >= 0, replay, free_ids)
        chosen = probs.gather(1, ids)  # (N, k)
        renorm = SOFTMAX_TOPK_ROUTERS[type(router).__name__]
        if renorm if renorm is not None else bool(getattr(router, "norm_topk_prob", False)):
            new_weights = chosen / chosen.sum(-1, keepdim=True)
        else:
            new_weights = chosen
        if state.want_stats:
            state.stats[index] = _stats(probs, chosen, ids, free_ids, state.token_mask)
        if state.replay is None:
            return None
        return logits, new_weights.to(weights.dtype), ids

    return hook


def _stats(
    probs: torch.Tensor,
    chosen: torch.Tensor,
    ids: torch.Tensor,
    free_ids: torch.Tensor,
    token_mask: torch.Tensor | None,
) -> RoutingStats:
    """RoutingStats of one layer: probs (N, E) with grad, chosen (N, k) their values at ids (N, k)."""
    real = token_mask if token_mask is not None else torch.ones(probs.shape[0], dtype=torch.bool)
    real = real.to(probs.device)
    n_real = real.sum().clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)  # (N,)
    return RoutingStats(
        confidence=chosen.sum(-1).detach(),
        expert_counts=torch.bincount(ids[real].flatten(), minlength=probs.shape[-1]).detach(),
        ids=ids.detach(),
        free_ids=free_ids.detach(),
        entropy=entropy.detach(),
        mean_score=(probs * real[:, None]).sum(0) / n_real,
    )


def _finish(state: _ForwardState) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not state.want_stats:
            return None
        stats = [state.stats[i] for i in range(len(state.routers)) if i in state.stats]
        if len(stats) != len(state.routers):
            return None  # a forward that skipped layers (none here): report nothing rather than a part
        B, T = output.logits.shape[:2]
        output.routing_confidence = torch.stack([s.confidence for s in stats]).mean(0).view(B, T)
        output.expert_load = torch.stack([s.expert_counts for s in stats])
        output.router_stats = stats
        output.expert_ids = torch.stack([s.ids for s in stats], dim=1).view(B, T, len(stats), -1)
        return output

    return hook
