"""MIS filters: which tokens and trajectories may train the policy (docs/algorithm.md, "Filters").

    log x_t    = log pi_old(a_t) - log pi_rollout(a_t)        token log-ratio, (B, T)
    log rho    = mean of log x_t over generated tokens         trajectory statistic, (B,)
    token ok   = lo_tok  <= x_t <= hi_tok
    traj ok    = lo_traj <= rho <= hi_traj   fixed | adaptive band
               | u < exp(-|log rho| / tau)   stochastic, u ~ U[0, 1)
               | always                      off

Compute the filter ONCE per training step on the whole batch (`MISFilter.__call__`), then slice the
result per micro-batch with `FilterResult.select`: the adaptive quantile and the stochastic draws are
batch-level, and recomputing them per micro-batch would break the 8x1 == 1x8 invariance.
Tensors are right-padded; `loss_mask` (B, T) is 1 on generated tokens (never prompt or tool output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from rlstack.mispo.config import AlgorithmConfig

Band = tuple[float, float]


def _float(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precision; ratios near 1 +- 1e-3 are meaningless in bf16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_log_ratio(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """log x_t = log pi_old - log pi_rollout on generated tokens, 0 elsewhere. (B, T) -> (B, T)."""
    mask = loss_mask.bool()
    return torch.where(mask, _float(old_logp) - _float(rollout_logp), 0.0).detach()


def traj_log_rho(log_ratio: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log rho = mean of log x_t over generated tokens; 0 for a sequence with none. (B, T) -> (B,)."""
    mask = loss_mask.bool()
    n = mask.sum(-1).clamp(min=1)  # (B,)
    return torch.where(mask, log_ratio, 0.0).sum(-1) / n


def band_mask(log_value: torch.Tensor, band: Band) -> torch.Tensor:
    """1[lo <= exp(log_value) <= hi], compared in log space. Any shape -> bool, same shape."""
    lo, hi = band
    return (log_value >= math.log(lo)) & (log_value <= math.log(hi))


def quantiles(values: torch.Tensor, qs: list[float]) -> list[float]:
    """Linear-interpolated quantiles of the finite entries of a 1-D tensor, 0 if there are none
    (torch.quantile without its 16M-element limit)."""
    v = values[torch.isfinite(values)].double().sort().values  # (N,)
    if v.numel() == 0:
        return [0.0 for _ in qs]
    out = []
    for q in qs:
        pos = q * (v.numel() - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, v.numel() - 1)
        out.append(float(v[lo] + (pos - lo) * (v[hi] - v[lo])))
    return out


class AdaptiveTrajBand:
    """Symmetric trajectory band [exp(-b), exp(b)] that tracks a target acceptance rate.

    Each `update`: q = quantile_{A*}(|log rho|) over the batch's trajectories, b <- beta * b + (1 - beta) * q
    (b = q on the first step), then b is clamped to [log_band_min, log_band_max].
    """

    def __init__(
        self, target_acceptance: float, ema: float, log_band_min: float, log_band_max: float
    ) -> None:
        self.target_acceptance = target_acceptance
        self.ema = ema
        self.log_band_min = log_band_min
        self.log_band_max = log_band_max
        self.log_band: float | None = None  # None until the first batch arrives
        self.steps = 0

    @property
    def band(self) -> Band:
        """Current band in ratio space; before the first update, the widest allowed band."""
        b = self.log_band_max if self.log_band is None else self.log_band
        return (math.exp(-b), math.exp(b))

    def update(self, log_rho: torch.Tensor, seq_mask: torch.Tensor) -> Band:
        """Fold one batch of log rho (B,) (only rows with seq_mask (B,) set) into the band; return it."""
        values = log_rho[seq_mask.bool()].abs()  # (N,)
        values = values[torch.isfinite(values)]  # a NaN log-prob must not poison the band forever
        if values.numel() > 0:
            (q,) = quantiles(values, [self.target_acceptance])
            b = q if self.log_band is None else self.ema * self.log_band + (1.0 - self.ema) * q
            self.log_band = min(max(b, self.log_band_min), self.log_band_max)
            self.steps += 1
        return self.band

    def state_dict(self) -> dict[str, float | int | None]:
        return {"log_band": self.log_band, "steps": self.steps}

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        self.log_band = None if state["log_band"] is None else float(state["log_band"])
        self.steps = int(state["steps"])  # type: ignore[arg-type]


class StochasticTrajFilter:
    """Keep a trajectory with probability exp(-|log rho| / tau): a soft version of the fixed band.

    rho = 1 is always kept; half are dropped at |log rho| = tau * ln 2. The scale matters: real log rho
    are ~1e-4..1e-2, so tau = 1 (min(rho, 1/rho), the plain Metropolis rule) would keep >99% of them and
    filter nothing. With tau on the scale of the paper's band (AlgorithmConfig.stochastic_tau, default
    0.0036: half dropped at 0.0025, between the band's log half-widths 0.0010 and 0.0040), mildly
    off-policy trajectories still train sometimes instead of never, while far ones almost never do.
    Draws come from an own seeded generator, so a run (and a resumed checkpoint) is reproducible.
    """

    def __init__(self, seed: int, tau: float) -> None:
        if not tau > 0.0:
            raise ValueError(f"stochastic trajectory filter: tau = {tau} must be > 0")
        self.tau = tau
        self.generator = torch.Generator().manual_seed(seed)

    def accept_prob(self, log_rho: torch.Tensor) -> torch.Tensor:
        """exp(-|log rho| / tau), float64 on the CPU; 0 for NaN. (B,) -> (B,)."""
        p = torch.exp(-log_rho.detach().abs().double().cpu() / self.tau)  # (B,)
        return torch.nan_to_num(p, nan=0.0)

    def __call__(self, log_rho: torch.Tensor) -> torch.Tensor:
        """(B,) float -> (B,) bool."""
        accept_prob = self.accept_prob(log_rho)  # (B,)
        u = torch.rand(accept_prob.shape, generator=self.generator, dtype=torch.float64)  # (B,) in [0, 1)
        return (u < accept_prob).to(log_rho.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class FilterResult:
    """Output of the MIS filter for one batch. Masks are bool and already exclude non-generated tokens."""

    token_mask: torch.Tensor  # (B, T) token band & loss mask
    traj_mask: torch.Tensor  # (B,)   trajectory accepted
    combined: torch.Tensor  # (B, T) token & trajectory & loss mask: the tokens that train
    log_ratio: torch.Tensor  # (B, T) log x_t (0 off the loss mask)
    log_rho: torch.Tensor  # (B,)   log rho
    metrics: dict[str, float] = field(default_factory=dict)

    def select(self, rows: slice | torch.Tensor) -> FilterResult:
        """The same result restricted to some rows (a micro-batch); metrics stay batch-level."""
        return replace(
            self,
            token_mask=self.token_mask[rows],
            traj_mask=self.traj_mask[rows],
            combined=self.combined[rows],
            log_ratio=self.log_ratio[rows],
            log_rho=self.log_rho[rows],
        )


def filter_metrics(
    log_ratio: torch.Tensor,
    log_rho: torch.Tensor,
    loss_mask: torch.Tensor,
    token_mask: torch.Tensor,
    traj_mask: torch.Tensor,
    combined: torch.Tensor,
) -> dict[str, float]:
    """Acceptance rates and log-ratio statistics over generated tokens / non-empty trajectories."""
    mask = loss_mask.bool()  # (B, T)
    has_tokens = mask.any(-1)  # (B,)
    n_tok = max(int(mask.sum()), 1)
    n_traj = max(int(has_tokens.sum()), 1)
    p05, p50, p95 = quantiles(log_ratio[mask], [0.05, 0.5, 0.95])
    abs_log_rho = log_rho[has_tokens].abs()  # (N,)
    finite = torch.isfinite(abs_log_rho)
    return {
        "filter/token_accept": float((token_mask & mask).sum()) / n_tok,
        "filter/traj_accept": float((traj_mask & has_tokens).sum()) / n_traj,
        "filter/combined_accept": float((combined & mask).sum()) / n_tok,
        "filter/log_ratio_p05": p05,
        "filter/log_ratio_p50": p50,
        "filter/log_ratio_p95": p95,
        "filter/abs_log_rho_mean": float(abs_log_rho[finite].sum()) / max(int(finite.sum()), 1),
        # NaN/inf log-probs from an engine are rejected by every band; count them rather than log NaN
        "filter/nonfinite_tokens": float((~torch.isfinite(log_ratio) & mask).sum()),
    }


def apply_filters(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    loss_mask: torch.Tensor,
    token_band: Band,
    traj_band: Band | None,
) -> FilterResult:
    """Stateless MIS filter with fixed bands (`traj_band=None`: no trajectory filter). (B, T) inputs."""
    mask = loss_mask.bool()  # (B, T)
    log_ratio = token_log_ratio(old_logp, rollout_logp, mask)  # (B, T)
    return _result(log_ratio, traj_log_rho(log_ratio, mask), mask, token_band, traj_band)


def _result(
    log_ratio: torch.Tensor,
    log_rho: torch.Tensor,
    mask: torch.Tensor,
    token_band: Band,
    traj: Band | torch.Tensor | None,
) -> FilterResult:
    """Masks from the statistics; `traj` is a band for rho, a ready (B,) bool mask, or None (accept all)."""
    token_mask = band_mask(log_ratio, token_band) & mask  # (B, T)
    metrics: dict[str, float] = {}
    if traj is None:
        traj_mask = torch.ones_like(log_rho, dtype=torch.bool)  # (B,)
    elif isinstance(traj, torch.Tensor):
        traj_mask = traj
    else:
        traj_mask = band_mask(log_rho, traj)
        metrics = {"filter/traj_band_lo": traj[0], "filter/traj_band_hi": traj[1]}
    combined = token_mask & traj_mask[:, None]  # (B, T)
    metrics = filter_metrics(log_ratio, log_rho, mask, token_mask, traj_mask, combined) | metrics
    return FilterResult(token_mask, traj_mask, combined, log_ratio, log_rho, metrics)


class MISFilter:
    """The configured MIS filter, owning the state of the adaptive band / stochastic generator.

    mis_filter = MISFilter(cfg)
    result = mis_filter(old_logp, rollout_logp, loss_mask)   # once per step, on the whole batch
    checkpoint["mis_filter"] = mis_filter.state_dict()
    """

    def __init__(self, cfg: AlgorithmConfig) -> None:
        self.cfg = cfg
        self.adaptive = AdaptiveTrajBand(
            cfg.adaptive_target_acceptance,
            cfg.adaptive_ema,
            cfg.adaptive_log_band_min,
            cfg.adaptive_log_band_max,
        )
        self.stochastic = StochasticTrajFilter(cfg.seed, cfg.stochastic_tau)

    def __call__(
        self, old_logp: torch.Tensor, rollout_logp: torch.Tensor, loss_mask: torch.Tensor
    ) -> FilterResult:
        """(B, T) log-probs of the sampled tokens and loss mask -> FilterResult."""
        mask = loss_mask.bool()  # (B, T)
        log_ratio = token_log_ratio(old_logp, rollout_logp, mask)  # (B, T)
        log_rho = traj_log_rho(log_ratio, mask)  # (B,)
        traj: Band | torch.Tensor | None
        match self.cfg.traj_filter:
            case "fixed":
                traj = self.cfg.traj_band
            case "adaptive":
                traj = self.adaptive.update(log_rho, mask.any(-1))
            case "stochastic":
                traj = self.stochastic(log_rho)
            case "off":
                traj = None
        return _result(log_ratio, log_rho, mask, self.cfg.token_band, traj)

    def state_dict(self) -> dict[str, dict]:
        return {"adaptive": self.adaptive.state_dict(), "stochastic": self.stochastic.state_dict()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        self.adaptive.load_state_dict(state["adaptive"])
        self.stochastic.load_state_dict(state["stochastic"])
