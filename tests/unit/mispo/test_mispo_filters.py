"""MIS filters: token / trajectory masks, adaptive band, stochastic filter. Expected values by hand."""

import io
import math

import pytest
import torch

from rlstack.mispo import (
    AdaptiveTrajBand,
    AlgorithmConfig,
    MISFilter,
    StochasticTrajFilter,
    apply_filters,
    band_mask,
    token_log_ratio,
    traj_log_rho,
)

LOG3 = math.log(3.0)
# Four rollouts, right-padded to T = 3. Row 3 is a single-token response.
LOG_X = torch.tensor(
    [
        [0.0, 0.0005, -0.0005],  # mean 0       -> rho = 1      : traj ok,    every token ok
        [0.006, 0.0, 0.0],  # mean 0.002   -> rho = 1.002  : traj REJECTED (> 1.001)
        [LOG3, -LOG3, 0.0],  # mean 0       -> rho = 1      : traj ok,    x = 3 and 1/3 both rejected
        [-0.003, 0.0, 0.0],  # mean -0.003  -> rho = 0.997  : traj ok (>= 0.996), token ok
    ]
)
LOSS_MASK = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]])


def _logps(log_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rollout = torch.full_like(log_x, -2.0)
    return rollout + log_x, rollout  # old_logp, rollout_logp


def test_token_log_ratio_and_log_rho():
    old = torch.tensor([[-1.0, -2.0, float("-inf")]])  # padding may hold -inf
    rollout = torch.tensor([[-1.5, -1.0, -3.0]])
    mask = torch.tensor([[1, 1, 0]])
    log_x = token_log_ratio(old, rollout, mask)
    # log x = old - rollout = [0.5, -1.0], padding -> 0
    torch.testing.assert_close(log_x, torch.tensor([[0.5, -1.0, 0.0]]))
    # log rho = (0.5 - 1.0) / 2 generated tokens = -0.25
    torch.testing.assert_close(traj_log_rho(log_x, mask), torch.tensor([-0.25]))
    # a row with no generated tokens gets log rho = 0, not NaN
    assert traj_log_rho(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0.0


def test_band_mask_is_inclusive_in_log_space():
    log_x = torch.tensor(
        [math.log(0.5), math.log(2.0), math.log(0.49), math.log(2.01), 0.0], dtype=torch.float64
    )
    assert band_mask(log_x, (0.5, 2.0)).tolist() == [True, True, False, False, True]


def test_fixed_filter_masks_and_metrics():
    old, rollout = _logps(LOG_X)
    fr = apply_filters(old, rollout, LOSS_MASK, token_band=(0.5, 2.0), traj_band=(0.996, 1.001))
    assert fr.token_mask.tolist() == [
        [True, True, True],
        [True, True, True],
        [False, False, False],  # x = 3 > 2, x = 1/3 < 0.5; the third slot is padding
        [True, False, False],
    ]
    assert fr.traj_mask.tolist() == [True, False, True, True]
    assert fr.combined.tolist() == [
        [True, True, True],
        [False, False, False],  # whole trajectory rejected
        [False, False, False],
        [True, False, False],
    ]
    m = fr.metrics
    # 9 generated tokens: 7 pass the token band, 4 survive both filters; 3 of 4 trajectories pass.
    assert m["filter/token_accept"] == pytest.approx(7 / 9)
    assert m["filter/combined_accept"] == pytest.approx(4 / 9)
    assert m["filter/traj_accept"] == pytest.approx(3 / 4)
    # mean |log rho| = (0 + 0.002 + 0 + 0.003) / 4
    assert m["filter/abs_log_rho_mean"] == pytest.approx(0.00125, abs=1e-7)
    # sorted log x: [-L3, -0.003, -0.0005, 0, 0, 0, 0.0005, 0.006, L3], L3 = log 3 = 1.098612
    # p50 at position 4 -> 0; p05 at 0.4 -> -L3 + 0.4 * (L3 - 0.003) = -0.660367
    # p95 at 7.6 -> 0.006 + 0.6 * (L3 - 0.006) = 0.661567
    assert m["filter/log_ratio_p50"] == pytest.approx(0.0, abs=1e-7)
    assert m["filter/log_ratio_p05"] == pytest.approx(-0.660367, abs=1e-5)
    assert m["filter/log_ratio_p95"] == pytest.approx(0.661567, abs=1e-5)
    assert (m["filter/traj_band_lo"], m["filter/traj_band_hi"]) == (0.996, 1.001)
    assert all(isinstance(v, float) for v in m.values())


def test_traj_filter_off_keeps_token_mask_only():
    old, rollout = _logps(LOG_X)
    fr = MISFilter(AlgorithmConfig(traj_filter="off"))(old, rollout, LOSS_MASK)
    assert fr.traj_mask.all()
    assert torch.equal(fr.combined, fr.token_mask)
    assert fr.metrics["filter/combined_accept"] == pytest.approx(7 / 9)


def test_all_rejected_and_empty_batch_give_zero_rates_not_nan():
    old, rollout = _logps(torch.full((2, 3), 5.0))  # x = e^5 everywhere
    fr = apply_filters(old, rollout, torch.ones(2, 3), (0.5, 2.0), (0.996, 1.001))
    assert not fr.combined.any()
    assert fr.metrics["filter/combined_accept"] == 0.0
    empty = apply_filters(old, rollout, torch.zeros(2, 3), (0.5, 2.0), (0.996, 1.001))
    assert not empty.combined.any()
    assert all(math.isfinite(v) for v in empty.metrics.values())


def test_select_restricts_rows():
    old, rollout = _logps(LOG_X)
    fr = apply_filters(old, rollout, LOSS_MASK, (0.5, 2.0), (0.996, 1.001))
    sub = fr.select(slice(1, 3))
    assert sub.traj_mask.tolist() == [False, True]
    assert sub.combined.shape == (2, 3)
    assert sub.metrics == fr.metrics


def _band() -> AdaptiveTrajBand:
    return AdaptiveTrajBand(
        target_acceptance=0.5, ema=0.9, log_band_min=math.log(1.0002), log_band_max=math.log(1.01)
    )


def test_adaptive_band_quantile_ema_and_clamp():
    band = _band()
    all_rows = torch.ones(4, dtype=torch.bool)
    # step 1: median of |log rho| = [0.001, 0.002, 0.003, 0.004] is at position 1.5 -> 0.0025; b = q at first
    lo, hi = band.update(torch.tensor([0.001, -0.002, 0.003, -0.004], dtype=torch.float64), all_rows)
    assert band.log_band == pytest.approx(0.0025)
    assert (lo, hi) == pytest.approx((math.exp(-0.0025), math.exp(0.0025)))
    # step 2: q = median(0.02, 0.03) = 0.025 -> b = 0.9 * 0.0025 + 0.1 * 0.025 = 0.00475
    band.update(torch.tensor([0.02, -0.03]), torch.ones(2, dtype=torch.bool))
    assert band.log_band == pytest.approx(0.00475)
    # step 3: q = 1 -> 0.9 * 0.00475 + 0.1 = 0.104275, clamped to log 1.01 = 0.00995033
    band.update(torch.tensor([1.0, 1.0]), torch.ones(2, dtype=torch.bool))
    assert band.log_band == pytest.approx(math.log(1.01))
    # a fresh band fed perfect trajectories (q = 0) clamps up to log 1.0002
    fresh = _band()
    fresh.update(torch.zeros(3), torch.ones(3, dtype=torch.bool))
    assert fresh.log_band == pytest.approx(math.log(1.0002))
    assert band.steps == 3


def test_adaptive_band_ignores_empty_rows_and_empty_batches():
    band = _band()
    # row 1 has no generated tokens: its log rho must not move the quantile. Median of [0.004] = 0.004.
    band.update(torch.tensor([0.004, 5.0]), torch.tensor([True, False]))
    assert band.log_band == pytest.approx(0.004)
    band.update(torch.tensor([5.0]), torch.tensor([False]))  # nothing valid: unchanged
    assert band.log_band == pytest.approx(0.004)
    assert band.steps == 1


def test_adaptive_filter_through_misfilter_accepts_target_fraction():
    torch.manual_seed(0)
    cfg = AlgorithmConfig(traj_filter="adaptive", adaptive_target_acceptance=0.5, token_band=(1e-9, 1e9))
    log_rho = torch.linspace(0.0001, 0.004, 9)  # one token per row: log rho = log x
    old, rollout = _logps(log_rho[:, None])
    fr = MISFilter(cfg)(old, rollout, torch.ones(9, 1))
    # b = median = 5th of 9 evenly spaced values; rows 0..4 satisfy |log rho| <= b
    assert fr.traj_mask.tolist() == [True] * 5 + [False] * 4
    assert fr.metrics["filter/traj_band_hi"] == pytest.approx(math.exp(log_rho[4].item()), rel=1e-6)


def test_adaptive_state_dict_round_trip_through_torch_save():
    cfg = AlgorithmConfig(traj_filter="adaptive", adaptive_target_acceptance=0.5)
    a = MISFilter(cfg)
    a.adaptive.update(torch.tensor([0.001, 0.002, 0.003]), torch.ones(3, dtype=torch.bool))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = MISFilter(cfg)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.adaptive.state_dict() == a.adaptive.state_dict()
    batch = torch.tensor([0.004, 0.0001, 0.006])
    assert a.adaptive.update(batch, torch.ones(3, dtype=torch.bool)) == b.adaptive.update(
        batch, torch.ones(3, dtype=torch.bool)
    )


def _binomial_tol(p: float, n: int) -> float:
    """5 standard deviations of an empirical acceptance rate over n draws (flaky with prob ~ 6e-7)."""
    return 5 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_stochastic_acceptance_probability_formula():
    filt = StochasticTrajFilter(seed=0, tau=0.002)
    # p = exp(-|log rho| / tau): |log rho| = 0 -> 1; 0.001 -> e^-0.5; -0.004 -> e^-2; NaN -> 0 (rejected)
    log_rho = torch.tensor([0.0, 0.001, -0.004, float("nan")])
    expected = [1.0, 0.6065307, 0.1353353, 0.0]
    assert filt.accept_prob(log_rho).tolist() == pytest.approx(expected, abs=1e-7)
    assert filt(torch.zeros(10_000)).all()  # u < 1 always: a perfectly on-policy trajectory is always kept
    assert not filt(torch.full((100,), float("nan"))).any()


@pytest.mark.parametrize(
    ("log_rho", "p"),
    [
        (0.002 * math.log(2), 0.5),  # tau ln 2 -> exactly half kept
        (-0.001, math.exp(-0.5)),  # 0.606531
        (0.004, math.exp(-2.0)),  # 0.135335
    ],
)
def test_stochastic_empirical_acceptance_matches_the_formula(log_rho: float, p: float):
    n = 20_000
    kept = StochasticTrajFilter(seed=1, tau=0.002)(torch.full((n,), log_rho))
    assert abs(kept.double().mean().item() - p) < _binomial_tol(p, n)


def test_stochastic_default_scale_matters_at_real_ratios():
    cfg = AlgorithmConfig(traj_filter="stochastic")
    filt = MISFilter(cfg).stochastic
    assert filt.tau == cfg.stochastic_tau == 0.0036
    # half rejected at |log rho| = 0.0025, the mean of the fixed band's log half-widths 0.0010 and 0.0040:
    # exp(-0.0025 / 0.0036) = exp(-0.694444) = 0.499352
    p_mid, p_real, p_tiny = filt.accept_prob(torch.tensor([0.0025, 0.01, 1e-4], dtype=torch.float64)).tolist()
    assert p_mid == pytest.approx(0.499352, abs=1e-6)
    assert p_real == pytest.approx(math.exp(-0.01 / 0.0036), abs=1e-9)  # 0.062177: mostly rejected
    assert p_tiny == pytest.approx(math.exp(-1e-4 / 0.0036), abs=1e-9)  # 0.972604: mostly kept
    # the old rule, min(rho, 1/rho) = exp(-|log rho|), would keep 99% at |log rho| = 0.01
    assert math.exp(-0.01) > 0.99


def test_stochastic_rejects_a_bad_scale():
    with pytest.raises(ValueError, match=r"tau = 0\.0 must be > 0"):
        StochasticTrajFilter(seed=0, tau=0.0)


def test_stochastic_reproducible_with_seed_and_resumable():
    log_rho = torch.full((2000,), 0.001 * math.log(2.0))  # p = 0.5 with tau = 0.001
    a, b, c = StochasticTrajFilter(7, 0.001), StochasticTrajFilter(7, 0.001), StochasticTrajFilter(8, 0.001)
    draw_a = a(log_rho)
    assert torch.equal(draw_a, b(log_rho))
    assert not torch.equal(draw_a, c(log_rho))
    assert abs(draw_a.double().mean().item() - 0.5) < _binomial_tol(0.5, 2000)
    # resuming from a state dict continues the exact same stream
    state = a.state_dict()
    expected = a(log_rho)
    resumed = StochasticTrajFilter(123, 0.001)
    resumed.load_state_dict(state)
    assert torch.equal(resumed(log_rho), expected)


def test_stochastic_state_round_trips_through_torch_save():
    cfg = AlgorithmConfig(traj_filter="stochastic", stochastic_tau=0.002, seed=4)
    log_x = torch.full((500, 1), 0.002 * math.log(2.0))  # one token per row: log rho = log x, p = 0.5
    old, rollout = _logps(log_x)
    mask = torch.ones(500, 1)
    a = MISFilter(cfg)
    a(old, rollout, mask)  # advance the stream past the start
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = MISFilter(cfg.model_copy(update={"seed": 99}))  # the seed must not matter after loading
    b.load_state_dict(torch.load(buf, weights_only=True))
    ra, rb = a(old, rollout, mask), b(old, rollout, mask)
    assert torch.equal(ra.traj_mask, rb.traj_mask)
    assert 0 < int(ra.traj_mask.sum()) < 500


def test_stochastic_through_misfilter_same_seed_same_masks():
    cfg = AlgorithmConfig(traj_filter="stochastic", seed=3)  # default tau 0.0036
    torch.manual_seed(0)
    log_x = 0.005 * torch.randn(64, 5)  # |log rho| ~ 0.002: real-scale ratios
    old, rollout = _logps(log_x)
    mask = torch.ones(64, 5)
    r1, r2 = MISFilter(cfg)(old, rollout, mask), MISFilter(cfg)(old, rollout, mask)
    assert torch.equal(r1.combined, r2.combined)
    assert 0 < r1.traj_mask.sum() < 64


def test_nan_rollout_logprob_is_rejected_and_does_not_poison_the_band():
    cfg = AlgorithmConfig(traj_filter="adaptive", adaptive_target_acceptance=1.0)
    old = torch.full((2, 2), -1.0)
    rollout = torch.tensor([[-1.0, float("nan")], [-1.002, -1.0]])  # row 1: log rho = 0.002 / 2 = 0.001
    filt = MISFilter(cfg)
    fr = filt(old, rollout, torch.ones(2, 2))
    assert fr.token_mask.tolist() == [[True, False], [True, True]]
    assert fr.traj_mask.tolist() == [False, True]
    # the NaN row is left out of the quantile: b = |log rho of row 1| = 0.001
    assert filt.adaptive.log_band == pytest.approx(0.001, rel=1e-3)
    assert all(math.isfinite(v) for v in fr.metrics.values())
    assert fr.metrics["filter/nonfinite_tokens"] == 1.0
