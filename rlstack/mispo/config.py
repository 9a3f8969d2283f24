"""Typed configuration of the policy-optimisation algorithm (MIS-PO and its baselines).

Imports pydantic only (no torch), so a config file parses and validates before torch is loaded.
Defaults follow docs/algorithm.md; the paper's values are marked [S], our own choices [I].
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

AlgorithmName = Literal["mispo", "grpo", "gspo", "ppo"]
TrajFilter = Literal["fixed", "adaptive", "stochastic", "off"]
LossNorm = Literal["token_mean", "seq_mean"]


class AlgorithmConfig(BaseModel):
    """Which policy loss to use, how MIS filters tokens and trajectories, and how losses are normalised."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: AlgorithmName = "mispo"
    """Policy loss: `mispo` (binary MIS masks, no ratio), `grpo`/`ppo` (token-ratio PPO clip) or `gspo`
    (sequence-ratio clip). `grpo` and `ppo` share a loss; they differ only in the advantage you pair them
    with (`advantage: group` vs `critic`)."""

    token_band: tuple[float, float] = (0.5, 2.0)
    """[S] Accepted range [lo, hi] of the token ratio x_t = pi_old / pi_rollout (both ends inclusive)."""

    traj_filter: TrajFilter = "fixed"
    """Trajectory-level filter on rho = exp(mean_t log x_t): `fixed` uses `traj_band`; `adaptive` sets a
    symmetric log-band from a quantile of |log rho| each step; `stochastic` keeps a trajectory with
    probability exp(-|log rho| / stochastic_tau); `off` keeps every trajectory (token mask only)."""

    traj_band: tuple[float, float] = (0.996, 1.001)
    """[S] Accepted range [lo, hi] of the trajectory ratio rho when `traj_filter: fixed`."""

    adaptive_target_acceptance: float = 0.9
    """[I] Target fraction A* of trajectories the adaptive band accepts: b = quantile_{A*}(|log rho|)."""

    adaptive_ema: float = 0.9
    """EMA factor beta of the adaptive log-band: b <- beta * b + (1 - beta) * quantile (step 1: quantile)."""

    adaptive_log_band_min: float = math.log(1.0002)
    """Lower clamp of the adaptive log-band b (band is [exp(-b), exp(b)])."""

    adaptive_log_band_max: float = math.log(1.01)
    """Upper clamp of the adaptive log-band b."""

    stochastic_tau: float = 0.0036
    """[I] Scale of the `stochastic` filter: a trajectory is kept with probability exp(-|log rho| / tau), so
    half are dropped at |log rho| = tau * ln 2. The default 0.0036 ~= 0.0025 / ln 2 puts that point at
    0.0025, the mean of the fixed band's log half-widths (log 1.001 = 0.0010, -log 0.996 = 0.0040): it
    rejects at the |log rho| the paper's band does, but softly. (tau = 1 is min(rho, 1/rho), which keeps
    >99% of trajectories at real ratios, |log rho| ~ 1e-4..1e-2.)"""

    seed: int = 0
    """Seed of the generator the `stochastic` trajectory filter draws from (its state is checkpointed)."""

    advantage: Literal["group", "critic"] = "group"
    """`group`: A = (R - mean_group) / (std_group + eps), no critic (CPU default). `critic`: [S] actor-critic
    with gamma = lambda = 1, A_t = R - V(s_t), truncated responses bootstrap R = V(s_T)."""

    group_std: bool = True
    """Divide group advantages by the group's standard deviation (False: only subtract the group mean)."""

    adv_eps: float = 1e-6
    """Added to the group std before dividing; groups with zero reward variance get advantage exactly 0."""

    loss_norm: LossNorm = "token_mean"
    """[I] `token_mean`: sum over tokens / number of generated tokens in the mini-batch (filtered tokens still
    count, so a heavily filtered batch takes a smaller step). `seq_mean`: mean over sequences of each
    sequence's token-mean. Unset: `seq_mean` for `gspo` (its objective is sequence-level), else
    `token_mean`; the resolved config shows the value used."""

    clip_eps: float = 0.2
    """PPO/GRPO clip range of the token ratio pi_theta / pi_old: [1 - eps, 1 + eps]."""

    gspo_clip_eps: float = 1e-4
    """GSPO clip range of the sequence ratio (the paper's best values were in {1..4}e-4)."""

    tis_cap: float | None = None
    """Baselines only: multiply each token's loss by the truncated importance weight
    min(pi_old / pi_rollout, tis_cap) (detached). None disables it."""

    baseline_mis_masks: bool = False
    """Baselines only: also apply the MIS token/trajectory masks to GRPO/PPO/GSPO."""

    kl_coef: float = 0.0
    """Coefficient of the unbiased KL(pi_theta || pi_ref) penalty; 0 turns it off (the paper uses 0.001
    when it is on). Requires reference log-probs."""

    @model_validator(mode="before")
    @classmethod
    def _default_loss_norm(cls, data: Any) -> Any:
        """Fill in `loss_norm` from `name` when the user left it out (an explicit value is kept)."""
        if isinstance(data, dict) and "loss_norm" not in data:
            data = {**data, "loss_norm": "seq_mean" if data.get("name") == "gspo" else "token_mean"}
        return data

    @property
    def traj_filter_is_stateless(self) -> bool:
        """Whether the trajectory filter needs no state across steps (`fixed`, `off`): any subset of rows,
        e.g. one micro-batch, can then be filtered on its own."""
        return self.traj_filter in ("fixed", "off")

    @model_validator(mode="after")
    def _check(self) -> AlgorithmConfig:
        for field in ("token_band", "traj_band"):
            lo, hi = getattr(self, field)
            if not 0.0 < lo <= hi:
                raise ValueError(
                    f"algorithm.{field} = ({lo}, {hi}): need 0 < lo <= hi (bounds on a probability ratio); "
                    f"e.g. {field}: [0.5, 2.0]"
                )
        if not 0.0 < self.adaptive_target_acceptance <= 1.0:
            raise ValueError(
                f"algorithm.adaptive_target_acceptance = {self.adaptive_target_acceptance}: must be in (0, 1]"
            )
        if not 0.0 <= self.adaptive_ema < 1.0:
            raise ValueError(f"algorithm.adaptive_ema = {self.adaptive_ema}: must be in [0, 1)")
        if not 0.0 < self.adaptive_log_band_min <= self.adaptive_log_band_max:
            raise ValueError(
                f"algorithm.adaptive_log_band_min/max = ({self.adaptive_log_band_min}, "
                f"{self.adaptive_log_band_max}): need 0 < min <= max (log-space half-widths)"
            )
        positive = {
            "clip_eps": self.clip_eps,
            "gspo_clip_eps": self.gspo_clip_eps,
            "adv_eps": self.adv_eps,
            "stochastic_tau": self.stochastic_tau,
        }
        if self.tis_cap is not None:
            positive["tis_cap"] = self.tis_cap
        for field, value in positive.items():
            if not value > 0.0:
                raise ValueError(f"algorithm.{field} = {value}: must be > 0")
        if self.kl_coef < 0.0:
            raise ValueError(f"algorithm.kl_coef = {self.kl_coef}: must be >= 0 (0 turns the KL penalty off)")
        return self
