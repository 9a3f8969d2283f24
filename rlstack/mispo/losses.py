"""Policy and critic losses. All inputs are per-token tensors of the sampled tokens, (B, T), right-padded.

Two masks travel together:
- `loss_mask` (B, T): generated tokens (not prompt, padding or tool output). It defines the denominators.
- `mask` (B, T): the subset that trains (for MIS-PO: token & trajectory accepted). Others contribute 0.

Gradient accumulation: every loss divides by an explicit `normalizer` computed ONCE from the whole
mini-batch (`loss_normalizer`), so summing the losses of its micro-batches gives exactly the loss and the
gradient of the mini-batch in one piece. With data parallelism that averages gradients over W ranks, pass
(global normalizer) / W.
"""

from __future__ import annotations

import torch

from rlstack.mispo.config import LossNorm


def loss_normalizer(loss_mask: torch.Tensor, loss_norm: LossNorm) -> float:
    """Denominator for a whole mini-batch: its generated tokens (`token_mean`) or its sequences with at
    least one generated token (`seq_mean`). At least 1, so an empty batch gives loss 0, not NaN."""
    mask = loss_mask.bool()  # (B, T)
    n = mask.sum() if loss_norm == "token_mean" else mask.any(-1).sum()
    return float(max(int(n), 1))


def aggregate(
    per_token: torch.Tensor, loss_mask: torch.Tensor, normalizer: float, loss_norm: LossNorm
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    token_mean: sum_{b,t} loss / normalizer.
    seq_mean:   sum_b (sum_t loss / n_b) / normalizer, n_b = generated tokens of row b (filtered ones count).
    """
    mask = loss_mask.bool()  # (B, T)
    per_token = torch.where(mask, per_token, 0.0)  # (B, T)
    if loss_norm == "token_mean":
        return per_token.sum() / normalizer
    n = mask.sum(-1).clamp(min=1)  # (B,)
    return (per_token.sum(-1) / n).sum() / normalizer


def _clean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the log-probs off the loss mask: padding may hold -inf/NaN, and exp() of it would poison
    gradients through torch.where (0 * inf = NaN in the backward pass)."""
    return torch.where(mask, x, 0.0)


def _frac(flags: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of `mask` entries where `flags` is set (0 when the mask is empty)."""
    n = int(mask.sum())
    return float((flags & mask).sum()) / n if n else 0.0


def mispo_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_mask: torch.Tensor,
    normalizer: float,
    loss_norm: LossNorm = "token_mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """MIS-PO actor loss: -(mask * log pi_theta * A), binary mask, no ratio weight, no clip.

    logp (B, T) log pi_theta of the sampled tokens (with grad); advantages (B, T) (detached here).
    d loss / d logp_t = -A_t / normalizer on trained tokens (token_mean), exactly 0 elsewhere.
    """
    loss_mask = loss_mask.bool()  # (B, T)
    logp = _clean(logp, loss_mask)  # (B, T)
    per_token = torch.where(mask.bool(), -advantages.detach() * logp, 0.0)  # (B, T)
    return aggregate(per_token, loss_mask, normalizer, loss_norm), {}


def tis_weights(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, loss_mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance weight min(pi_old / pi_rollout, cap), detached; 1 off the loss mask. (B, T)."""
    mask = loss_mask.bool()
    log_w = _clean(old_logp.detach() - rollout_logp.detach(), mask)  # (B, T)
    return log_w.exp().clamp(max=cap)


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_mask: torch.Tensor,
    normalizer: float,
    clip_eps: float = 0.2,
    tis_weight: torch.Tensor | None = None,
    loss_norm: LossNorm = "token_mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO / PPO-clip: max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps)) with r_t = pi_theta / pi_old,
    optionally times a detached TIS weight (B, T)."""
    loss_mask, mask = loss_mask.bool(), mask.bool()  # (B, T)
    adv = advantages.detach()  # (B, T)
    ratio = torch.exp(_clean(logp, loss_mask) - _clean(old_logp.detach(), loss_mask))  # (B, T)
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    per_token = torch.maximum(unclipped, clipped)  # (B, T) pessimistic bound
    if tis_weight is not None:
        per_token = per_token * tis_weight.detach()
    per_token = torch.where(mask, per_token, 0.0)
    metrics = {"actor/clip_frac": _frac(clipped > unclipped, mask)}
    if tis_weight is not None:
        metrics["actor/tis_weight_mean"] = float(tis_weight.detach()[mask].mean()) if mask.any() else 0.0
    return aggregate(per_token, loss_mask, normalizer, loss_norm), metrics


def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_mask: torch.Tensor,
    normalizer: float,
    clip_eps: float = 1e-4,
    loss_norm: LossNorm = "token_mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO, token form: s_i = exp(mean_t log(pi_theta / pi_old)) over row i's generated tokens, and
    per token max(-A s_it, -A clip(s_it, 1 - eps, 1 + eps)) with s_it = sg(s_i) * pi_theta_t / sg(pi_theta_t).

    s_it equals s_i in value; its gradient flows through token t only, so masked tokens give none, and
    with `seq_mean` the gradient is exactly GSPO's A_i * grad s_i.
    """
    loss_mask, mask = loss_mask.bool(), mask.bool()  # (B, T)
    adv = advantages.detach()  # (B, T)
    logp = _clean(logp, loss_mask)  # (B, T)
    log_ratio = logp - _clean(old_logp.detach(), loss_mask)  # (B, T), 0 off the loss mask
    log_s = log_ratio.sum(-1) / loss_mask.sum(-1).clamp(min=1)  # (B,) log of the geometric mean
    s_tok = torch.exp(log_s.detach()[:, None] + logp - logp.detach())  # (B, T)
    unclipped = -adv * s_tok  # (B, T)
    clipped = -adv * s_tok.clamp(1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    per_token = torch.where(mask, torch.maximum(unclipped, clipped), 0.0)  # (B, T)
    rows = mask.any(-1)  # (B,)
    metrics = {
        "actor/clip_frac": _frac(clipped > unclipped, mask),
        "actor/seq_ratio_mean": float(log_s.detach()[rows].exp().mean()) if rows.any() else 1.0,
    }
    return aggregate(per_token, loss_mask, normalizer, loss_norm), metrics


def kl_penalty(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    loss_mask: torch.Tensor,
    normalizer: float,
    loss_norm: LossNorm = "token_mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Unbiased KL(pi_theta || pi_ref) estimate on samples from pi_old (DeepSeek-V3.2):

        kl_t = (pi_theta / pi_old) * (pi_ref / pi_theta - log(pi_ref / pi_theta) - 1)

    Nothing is detached: its gradient is an unbiased estimate of grad KL. Returned without kl_coef.
    """
    loss_mask, mask = loss_mask.bool(), mask.bool()  # (B, T)
    logp = _clean(logp, loss_mask)  # (B, T)
    log_ref_over_theta = _clean(ref_logp.detach(), loss_mask) - logp  # (B, T)
    ratio = torch.exp(logp - _clean(old_logp.detach(), loss_mask))  # (B, T)
    kl = ratio * (torch.exp(log_ref_over_theta) - log_ref_over_theta - 1.0)  # (B, T), >= 0 up to the ratio
    kl = torch.where(mask, kl, 0.0)
    kl_mean = float(kl.detach().sum()) / max(int(mask.sum()), 1)
    return aggregate(kl, loss_mask, normalizer, loss_norm), {"actor/kl": kl_mean}


def critic_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    loss_mask: torch.Tensor,
    normalizer: float,
    loss_norm: LossNorm = "token_mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked MSE (V(s_t) - R_t)^2 of the critic. values (B, T) with grad; returns (B, T) targets."""
    mask = loss_mask.bool()  # (B, T)
    err = _clean(values, mask) - _clean(returns.detach(), mask)  # (B, T)
    n = max(int(mask.sum()), 1)
    metrics = {
        "critic/value_mean": float(_clean(values.detach(), mask).sum()) / n,
        "critic/mse": float((err.detach() ** 2).sum()) / n,
    }
    return aggregate(err**2, mask, normalizer, loss_norm), metrics
