"""Advantages: group-normalised (GRPO-style, no critic) or critic-based (the paper's actor-critic).

Everything here is computed without gradient: advantages and returns are targets, never trained through.
"""

from __future__ import annotations

import torch

from rlstack.mispo.config import AlgorithmConfig


def _group_index(batch: int, group_ids: torch.Tensor | None, group_size: int | None) -> torch.Tensor:
    """(B,) dense group index 0..G-1, from arbitrary group ids or a contiguous group size."""
    if (group_ids is None) == (group_size is None):
        raise ValueError("pass exactly one of group_ids (a (B,) tensor) or group_size (an int)")
    if group_ids is not None:
        if group_ids.shape != (batch,):
            raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected ({batch},)")
        return torch.unique(group_ids, return_inverse=True)[1]
    assert group_size is not None
    if group_size < 1 or batch % group_size != 0:
        raise ValueError(f"batch of {batch} rewards does not split into groups of {group_size}")
    return torch.arange(batch) // group_size


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    group_size: int | None = None,
    use_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """A = (R - mean_group) / (std_group + eps), or R - mean_group when `use_std=False`. (B,) -> (B,).

    std is the unbiased (Bessel-corrected) sample std, as in GRPO. A NaN reward marks an unscored sample:
    it is left out of its group's mean and std and gets A = 0 (the rest of the group keeps its
    advantages). A group whose scored rewards are all equal (including a group of one) gets A = 0 exactly,
    never NaN.
    """
    r = rewards.double()  # (B,)
    scored = torch.isfinite(r)  # (B,)
    r0 = torch.where(scored, r, 0.0)  # (B,) unscored rows contribute nothing to the sums
    w = scored.double()  # (B,)
    idx = _group_index(r.shape[0], group_ids, group_size).to(r.device)  # (B,)
    n_groups = int(idx.max()) + 1 if idx.numel() else 0
    zeros = torch.zeros(n_groups, dtype=r.dtype, device=r.device)  # (G,)
    count = zeros.index_add(0, idx, w)  # (G,) scored samples per group
    mean = zeros.index_add(0, idx, r0) / count.clamp(min=1)  # (G,)
    centered = torch.where(scored, r0 - mean[idx], 0.0)  # (B,)
    std = (zeros.index_add(0, idx, centered**2) / (count - 1).clamp(min=1)).sqrt()  # (G,)
    lo = torch.full_like(zeros, torch.inf).scatter_reduce(0, idx, torch.where(scored, r0, torch.inf), "amin")
    hi = torch.full_like(zeros, -torch.inf).scatter_reduce(
        0, idx, torch.where(scored, r0, -torch.inf), "amax"
    )
    constant = (hi <= lo)[idx]  # (B,) every scored reward in the group is the same (or none is scored)
    adv = centered / (std[idx] + eps) if use_std else centered  # (B,)
    return torch.where(constant | ~scored, 0.0, adv).to(rewards.dtype)


def last_token_index(loss_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last generated token of each row (0 for a row with none). (B, T) -> (B,) long."""
    positions = torch.arange(loss_mask.shape[-1], device=loss_mask.device)  # (T,)
    return torch.where(loss_mask.bool(), positions, -1).amax(-1).clamp(min=0)


@torch.no_grad()
def critic_advantages(
    rewards: torch.Tensor, values: torch.Tensor, loss_mask: torch.Tensor, truncated: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Actor-critic advantages with gamma = lambda = 1: A_t = R - V(s_t), returns R_t = R.

    rewards (B,) outcome rewards; loss_mask (B, T); truncated (B,) bool; values (B, T + 1) critic values,
    `values[b, t]` = V(s_t), the state token t was sampled in, and one column more so that position
    last + 1 holds V(s_T), the state AFTER row b's last generated token. Rows that hit the length limit
    have no outcome, so they bootstrap R = V(s_T) (reading V at the last token itself would be the state
    before it: one token early). Returns (advantages (B, T), returns (B, T)), both 0 off the loss mask.
    """
    mask = loss_mask.bool()  # (B, T)
    batch, width = mask.shape
    if values.shape != (batch, width + 1):
        raise ValueError(
            f"critic values have shape {tuple(values.shape)}, expected (B, T + 1) = ({batch}, {width + 1}): "
            "V(s_t) per position plus the state after the last token (LearnerGroup.compute_values)"
        )
    v_all = values.detach().to(torch.promote_types(values.dtype, torch.float32))  # (B, T + 1)
    v = v_all[:, :width]  # (B, T)
    v_final = v_all.gather(-1, (last_token_index(mask) + 1)[:, None]).squeeze(-1)  # (B,) V(s_T)
    ret = torch.where(truncated.bool(), v_final, rewards.to(v.dtype))  # (B,)
    returns = torch.where(mask, ret[:, None], 0.0)  # (B, T)
    advantages = torch.where(mask, returns - v, 0.0)  # (B, T)
    return advantages, returns


def compute_advantages(
    cfg: AlgorithmConfig,
    rewards: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    group_ids: torch.Tensor | None = None,
    group_size: int | None = None,
    values: torch.Tensor | None = None,
    truncated: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The configured advantage, per token: (advantages (B, T), returns (B, T) or None without a critic)."""
    mask = loss_mask.bool()  # (B, T)
    if cfg.advantage == "group":
        adv = group_advantages(rewards, group_ids, group_size, use_std=cfg.group_std, eps=cfg.adv_eps)  # (B,)
        return torch.where(mask, adv[:, None], 0.0), None
    if values is None or truncated is None:
        raise ValueError(
            "algorithm.advantage = 'critic' needs critic `values` (B, T + 1) and `truncated` (B,)"
        )
    return critic_advantages(rewards, values, mask, truncated)
