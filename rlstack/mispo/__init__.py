"""MIS-PO and baselines (GRPO/PPO-clip, GSPO) in pure PyTorch: filters, advantages, losses.

No Ray, vLLM or DeepSpeed here; names resolve lazily, so `from rlstack.mispo import AlgorithmConfig`
parses a config without importing torch. Spec: docs/algorithm.md. One training step, as the learner runs it:

    cfg = AlgorithmConfig(name="mispo", traj_filter="adaptive")
    mis_filter = MISFilter(cfg)  # long-lived; checkpoint mis_filter.state_dict()

    # whole step batch: (B, T) tensors over response tokens, right-padded
    fr = mis_filter(old_logp, rollout_logp, loss_mask)  # once per step -> FilterResult
    adv, returns = compute_advantages(cfg, rewards, loss_mask, group_ids=prompt_index)  # (B, T), None
    for mb in minibatches:  # index tensors (or slices) of rows
        norm = loss_normalizer(loss_mask[mb], cfg.loss_norm)  # once per mini-batch
        for micro in split(mb):
            loss, metrics = compute_policy_loss(
                cfg, logp[micro], old_logp[micro], rollout_logp[micro], adv[micro], loss_mask[micro],
                norm, filter_result=fr.select(micro), ref_logp=..., entropy=...,
            )
            loss.backward()  # summed over micro-batches == the mini-batch in one piece
        optimizer.step()

Public API
- `AlgorithmConfig` (pydantic; see its field docstrings).
- `compute_policy_loss(cfg, logp, old_logp, rollout_logp, advantages, loss_mask, normalizer, *,
  filter_result=None, ref_logp=None, entropy=None) -> (loss, metrics: dict[str, float])`.
  Metric keys: `actor/{loss,pg_loss,train_frac,clip_frac,tis_weight_mean,seq_ratio_mean,kl,entropy}` and
  `filter/{token,traj,combined}_accept`, `filter/log_ratio_p{05,50,95}`, `filter/abs_log_rho_mean`,
  `filter/traj_band_{lo,hi}`, `filter/nonfinite_tokens` (each only where it applies).
- `loss_normalizer(loss_mask, loss_norm) -> float`; `aggregate(per_token, loss_mask, normalizer, loss_norm)`.
- Filters: `MISFilter(cfg)(old_logp, rollout_logp, loss_mask) -> FilterResult` (`.state_dict()`,
  `.load_state_dict()`), `apply_filters(old_logp, rollout_logp, loss_mask, token_band, traj_band)`,
  `AdaptiveTrajBand`, `StochasticTrajFilter`, `token_log_ratio`, `traj_log_rho`, `band_mask`.
- Advantages: `compute_advantages(cfg, rewards, loss_mask, *, group_ids, group_size, values, truncated)`,
  `group_advantages(rewards, group_ids, group_size, use_std, eps) -> (B,)`,
  `critic_advantages(rewards, values, loss_mask, truncated) -> (advantages, returns)`.
- Losses, each `(..., mask, loss_mask, normalizer, ...) -> (loss, metrics)`: `mispo_loss`, `ppo_clip_loss`,
  `gspo_loss`, `kl_penalty`, `critic_loss`; `tis_weights(old_logp, rollout_logp, loss_mask, cap) -> (B, T)`.
- Registry: `register_policy_loss(name)`, `get_policy_loss(name)`, `policy_loss_names()`, `PolicyLossInput`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlstack.lazy import lazy_exports

# name -> submodule that defines it; imported on first access (see __getattr__).
_MODULE_OF = {
    "AlgorithmConfig": "config",
    "AdaptiveTrajBand": "filters",
    "FilterResult": "filters",
    "MISFilter": "filters",
    "StochasticTrajFilter": "filters",
    "apply_filters": "filters",
    "band_mask": "filters",
    "token_log_ratio": "filters",
    "traj_log_rho": "filters",
    "compute_advantages": "advantages",
    "critic_advantages": "advantages",
    "group_advantages": "advantages",
    "aggregate": "losses",
    "critic_loss": "losses",
    "gspo_loss": "losses",
    "kl_penalty": "losses",
    "loss_normalizer": "losses",
    "mispo_loss": "losses",
    "ppo_clip_loss": "losses",
    "tis_weights": "losses",
    "PolicyLossInput": "registry",
    "compute_policy_loss": "registry",
    "get_policy_loss": "registry",
    "policy_loss_names": "registry",
    "register_policy_loss": "registry",
}
__all__ = [
    "AdaptiveTrajBand",
    "AlgorithmConfig",
    "FilterResult",
    "MISFilter",
    "PolicyLossInput",
    "StochasticTrajFilter",
    "aggregate",
    "apply_filters",
    "band_mask",
    "compute_advantages",
    "compute_policy_loss",
    "critic_advantages",
    "critic_loss",
    "get_policy_loss",
    "group_advantages",
    "gspo_loss",
    "kl_penalty",
    "loss_normalizer",
    "mispo_loss",
    "policy_loss_names",
    "ppo_clip_loss",
    "register_policy_loss",
    "tis_weights",
    "token_log_ratio",
    "traj_log_rho",
]

if TYPE_CHECKING:
    from rlstack.mispo.advantages import compute_advantages, critic_advantages, group_advantages
    from rlstack.mispo.config import AlgorithmConfig
    from rlstack.mispo.filters import (
        AdaptiveTrajBand,
        FilterResult,
        MISFilter,
        StochasticTrajFilter,
        apply_filters,
        band_mask,
        token_log_ratio,
        traj_log_rho,
    )
    from rlstack.mispo.losses import (
        aggregate,
        critic_loss,
        gspo_loss,
        kl_penalty,
        loss_normalizer,
        mispo_loss,
        ppo_clip_loss,
        tis_weights,
    )
    from rlstack.mispo.registry import (
        PolicyLossInput,
        compute_policy_loss,
        get_policy_loss,
        policy_loss_names,
        register_policy_loss,
    )

__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF)
