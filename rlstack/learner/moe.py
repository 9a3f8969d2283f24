"""Mixture-of-Experts stability in the learner: the balancing loss, the router-bias update, expert-health
metrics and the routing-replay probes (docs/moe.md).

Everything reads the model's per-layer `RoutingStats` (rlstack.model.modeling) from a forward with
`output_router_stats`; nothing here imports DeepSpeed, so it runs in unit tests on a bare model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlstack.metrics import LOAD_PREFIX  # tokens per expert: moe/load/<layer>/<expert>


def balance_loss(stats: Sequence[Any], groups: int | None) -> torch.Tensor:
    """The EP-group balanced routing loss, averaged over MoE layers: G * sum_g f_g * P_g, where f_g is the
    share of the layer's routed (token, slot) pairs that went to group g's experts and P_g the group's
    share of the normalised router scores, both over real tokens. f is a count (no gradient); P carries
    the router's gradient. 1 at perfect balance, G when one group gets everything. `groups` None = one per
    expert (the plain load-balance loss of Switch / DeepSeek)."""
    losses = []
    for s in stats:
        counts = s.expert_counts.float()  # (E,)
        E = counts.shape[0]
        G = E if groups is None else groups
        if E % G:
            raise ValueError(f"learner.moe.balance_groups = {G} does not divide the {E} experts")
        f = counts.view(G, -1).sum(-1) / counts.sum().clamp(min=1)  # (G,)
        P = s.mean_score.view(G, -1).sum(-1)  # (G,) with grad
        losses.append(G * (f.to(P.dtype) * P).sum())
    return torch.stack(losses).mean()


def routing_arrays(stats: Sequence[Any], token_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Step-summable routing facts of one forward: (L, E) tokens per expert, (L,) sums of router entropy
    and routing confidence over real tokens, and the real-token count (float64, for MetricSums)."""
    real = token_mask.reshape(-1).bool()  # (N,)
    return {
        "moe/expert_tokens": torch.stack([s.expert_counts for s in stats]).double(),  # (L, E)
        "moe/entropy_sum": torch.stack([s.entropy[real].double().sum() for s in stats]),  # (L,)
        "moe/confidence_sum": torch.stack([s.confidence[real].double().sum() for s in stats]),  # (L,)
        "moe/real_tokens": real.double().sum().reshape(1),  # (1,)
    }


def health_metrics(arrays: dict[str, torch.Tensor], layer_ids: Sequence[int]) -> dict[str, float]:
    """Expert health of a step from its summed `routing_arrays`: per MoE layer (named by its layer index)
    max violation (max load / mean load - 1), dead experts (no token this step), router entropy and
    routing confidence (means over real tokens), plus their worst/mean over layers and the raw loads."""
    load = arrays["moe/expert_tokens"]  # (L, E)
    tokens = float(arrays["moe/real_tokens"].sum().clamp(min=1))
    out: dict[str, float] = {}
    violations, dead, entropy = [], [], []
    for i, layer in enumerate(layer_ids):
        mean = float(load[i].mean())
        violation = float(load[i].max()) / mean - 1.0 if mean > 0 else 0.0
        n_dead = float((load[i] == 0).sum())
        ent = float(arrays["moe/entropy_sum"][i]) / tokens
        out |= {
            f"moe/layer{layer}/max_violation": violation,
            f"moe/layer{layer}/dead_experts": n_dead,
            f"moe/layer{layer}/router_entropy": ent,
            f"moe/layer{layer}/routing_confidence": float(arrays["moe/confidence_sum"][i]) / tokens,
        }
        out |= {f"{LOAD_PREFIX}{layer}/{e}": float(load[i, e]) for e in range(load.shape[1])}
        violations.append(violation)
        dead.append(n_dead)
        entropy.append(ent)
    out |= {
        "moe/max_violation": max(violations),
        "moe/dead_experts": sum(dead),
        "moe/router_entropy": sum(entropy) / len(entropy),
    }
    return out


def routers(module: torch.nn.Module) -> list[Any]:
    """The model's MoE blocks (modules with a router selection bias), in layer order."""
    return [m for m in module.modules() if hasattr(m, "router_bias") and hasattr(m, "gate")]


@torch.no_grad()
def update_router_bias(module: torch.nn.Module, load: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3, Step 3.5 Flash): each layer's selection bias moves by
    `rate` toward balance, b_e += rate * sign(mean load - load_e). `load` (L, E): tokens per expert of
    the mini-batch over all ranks (identical on every rank, so the ranks' biases stay equal)."""
    blocks = routers(module)
    if len(blocks) != load.shape[0]:
        raise ValueError(f"router-bias update: {load.shape[0]} layers of loads for {len(blocks)} MoE layers")
    for block, layer_load in zip(blocks, load, strict=True):
        step = torch.sign(layer_load.mean() - layer_load) * rate  # (E,)
        block.router_bias.add_(step.to(block.router_bias.device, block.router_bias.dtype))


def routing_mismatch(
    free_ids: torch.Tensor, recorded: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[int, int]:
    """(differing, total) token-layer decisions between the learner's own routing `free_ids` and the
    engine's `recorded` routing, both (B, T, L, k), over real positions the engine recorded (order within
    the top-k ignored)."""
    valid = (recorded[..., 0] >= 0) & attention_mask.bool()[..., None]  # (B, T, L)
    a = free_ids.sort(-1).values
    b = recorded.long().sort(-1).values
    differ = (a != b).any(-1) & valid  # (B, T, L)
    return int(differ.sum()), int(valid.sum())


def logp_gap(logp: torch.Tensor, rollout_logp: torch.Tensor, loss_mask: torch.Tensor) -> tuple[float, float]:
    """(sum of |log pi_learner - log pi_rollout| over trained tokens, their count)."""
    mask = loss_mask.bool()
    finite = mask & torch.isfinite(logp)
    gap = (logp.detach().float() - rollout_logp.float()).abs()
    return float(gap[finite].sum()), float(finite.sum())
