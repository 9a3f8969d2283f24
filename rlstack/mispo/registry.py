"""Policy-loss registry (name -> loss function) and `compute_policy_loss`, the learner's one entry point."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlstack.mispo.config import AlgorithmConfig
from rlstack.mispo.filters import FilterResult, apply_filters
from rlstack.mispo.losses import gspo_loss, kl_penalty, mispo_loss, ppo_clip_loss, tis_weights


@dataclass
class PolicyLossInput:
    """What every registered policy loss receives. All tensors (B, T) over the sampled tokens."""

    logp: torch.Tensor  # log pi_theta, with grad
    old_logp: torch.Tensor  # log pi_old (learner recompute before the update)
    rollout_logp: torch.Tensor  # log pi_rollout (recorded by the inference engine)
    advantages: torch.Tensor  # A_t, 0 off the loss mask
    loss_mask: torch.Tensor  # bool, generated tokens: the denominators
    mask: torch.Tensor  # bool, tokens that train (loss mask, & MIS masks where they apply)
    normalizer: float  # from loss_normalizer() over the whole mini-batch


PolicyLossFn = Callable[[PolicyLossInput, AlgorithmConfig], tuple[torch.Tensor, dict[str, float]]]
_POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: register `fn` under `name`; a name can be registered once."""

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        if name in _POLICY_LOSSES:
            raise ValueError(f"policy loss '{name}' is already registered ({_POLICY_LOSSES[name].__name__})")
        _POLICY_LOSSES[name] = fn
        return fn

    return decorator


def policy_loss_names() -> list[str]:
    return sorted(_POLICY_LOSSES)


def get_policy_loss(name: str) -> PolicyLossFn:
    if name not in _POLICY_LOSSES:
        raise ValueError(f"unknown policy loss '{name}'; registered: {', '.join(policy_loss_names())}")
    return _POLICY_LOSSES[name]


@register_policy_loss("mispo")
def _mispo(inp: PolicyLossInput, cfg: AlgorithmConfig) -> tuple[torch.Tensor, dict[str, float]]:
    return mispo_loss(inp.logp, inp.advantages, inp.mask, inp.loss_mask, inp.normalizer, cfg.loss_norm)


@register_policy_loss("grpo")
@register_policy_loss("ppo")
def _ppo_clip(inp: PolicyLossInput, cfg: AlgorithmConfig) -> tuple[torch.Tensor, dict[str, float]]:
    tis = None
    if cfg.tis_cap is not None:
        tis = tis_weights(inp.old_logp, inp.rollout_logp, inp.loss_mask, cfg.tis_cap)
    return ppo_clip_loss(
        inp.logp,
        inp.old_logp,
        inp.advantages,
        inp.mask,
        inp.loss_mask,
        inp.normalizer,
        clip_eps=cfg.clip_eps,
        tis_weight=tis,
        loss_norm=cfg.loss_norm,
    )


@register_policy_loss("gspo")
def _gspo(inp: PolicyLossInput, cfg: AlgorithmConfig) -> tuple[torch.Tensor, dict[str, float]]:
    return gspo_loss(
        inp.logp,
        inp.old_logp,
        inp.advantages,
        inp.mask,
        inp.loss_mask,
        inp.normalizer,
        clip_eps=cfg.gspo_clip_eps,
        loss_norm=cfg.loss_norm,
    )


def _check_shapes(**tensors: torch.Tensor | None) -> None:
    shape = tensors["logp"].shape  # type: ignore[union-attr]
    if len(shape) != 2:
        raise ValueError(f"logp must be (B, T) per-token log-probs, got shape {tuple(shape)}")
    for name, t in tensors.items():
        if t is not None and t.shape != shape and not (name == "advantages" and t.shape == shape[:1]):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like logp")


def compute_policy_loss(
    cfg: AlgorithmConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    normalizer: float,
    *,
    filter_result: FilterResult | None = None,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Actor loss of one (micro-)batch for the configured algorithm, plus its metrics.

    logp (B, T) with grad; old_logp, rollout_logp, loss_mask, ref_logp, entropy (B, T); advantages (B, T)
    or (B,). `filter_result`: this micro-batch's rows of the step's `MISFilter` output; if omitted, a fixed
    or off trajectory filter is computed here (adaptive/stochastic need the stateful `MISFilter`).
    """
    _check_shapes(
        logp=logp,
        old_logp=old_logp,
        rollout_logp=rollout_logp,
        advantages=advantages,
        loss_mask=loss_mask,
        ref_logp=ref_logp,
        entropy=entropy,
    )
    loss_mask = loss_mask.bool()  # (B, T)
    use_mis = cfg.name == "mispo" or cfg.baseline_mis_masks
    if filter_result is None and cfg.traj_filter_is_stateless:
        traj_band = cfg.traj_band if cfg.traj_filter == "fixed" else None
        filter_result = apply_filters(old_logp, rollout_logp, loss_mask, cfg.token_band, traj_band)
    # A token the learner gives log-prob -inf (outside its top-k/top-p support) or NaN never trains.
    finite = torch.isfinite(logp.detach()) & torch.isfinite(old_logp)  # (B, T)
    if ref_logp is not None and cfg.kl_coef > 0.0:
        finite &= torch.isfinite(ref_logp)
    mask = loss_mask & finite  # (B, T) tokens that train
    if use_mis:
        if filter_result is None:
            raise ValueError(
                f"algorithm.traj_filter = '{cfg.traj_filter}' is stateful: compute it once per step with "
                "MISFilter(cfg)(old_logp, rollout_logp, loss_mask) and pass filter_result=result.select(rows)"
            )
        mask = filter_result.combined & mask
    adv = advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages  # (B, T)
    adv = torch.where(loss_mask, adv, 0.0)

    # Non-finite entries are never selected by `mask`; zero them so no inf/NaN reaches a product.
    logp = torch.where(finite, logp, 0.0)  # (B, T)
    old_logp = torch.where(finite, old_logp, 0.0)  # (B, T)
    if ref_logp is not None:
        ref_logp = torch.where(finite, ref_logp, 0.0)  # (B, T)
    inp = PolicyLossInput(logp, old_logp, rollout_logp, adv, loss_mask, mask, normalizer)
    loss, metrics = get_policy_loss(cfg.name)(inp, cfg)
    metrics["actor/pg_loss"] = float(loss.detach())
    if cfg.kl_coef > 0.0:
        if ref_logp is None:
            raise ValueError(f"algorithm.kl_coef = {cfg.kl_coef} needs reference log-probs (ref_logp)")
        kl_loss, kl_metrics = kl_penalty(logp, old_logp, ref_logp, mask, loss_mask, normalizer, cfg.loss_norm)
        loss = loss + cfg.kl_coef * kl_loss
        metrics |= kl_metrics
    n_tok = max(int(loss_mask.sum()), 1)
    if entropy is not None:
        metrics["actor/entropy"] = float(torch.where(loss_mask, entropy.detach(), 0.0).sum()) / n_tok
    metrics["actor/train_frac"] = float(mask.sum()) / n_tok
    # Tokens that can move the weights: trained with a nonzero advantage, or any trained token under KL.
    signal = mask if cfg.kl_coef > 0.0 else mask & (adv != 0)  # (B, T)
    metrics["actor/signal_tokens"] = float(signal.sum())
    metrics["actor/nonfinite_logp_tokens"] = float((loss_mask & ~finite).sum())
    metrics["actor/loss"] = float(loss.detach())
    if filter_result is not None:
        metrics |= filter_result.metrics
    return loss, metrics
