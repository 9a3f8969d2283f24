"""Loss functions with hand-derived values and gradients (torchtune style)."""

import math

import pytest
import torch

from rlstack.mispo import (
    aggregate,
    critic_loss,
    gspo_loss,
    kl_penalty,
    loss_normalizer,
    mispo_loss,
    ppo_clip_loss,
    tis_weights,
)

L = math.log


def test_loss_normalizer():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert loss_normalizer(mask, "token_mean") == 3.0  # generated tokens
    assert loss_normalizer(mask, "seq_mean") == 2.0  # sequences with >= 1 generated token
    assert loss_normalizer(torch.zeros(2, 3), "token_mean") == 1.0  # never divide by 0


def test_aggregate_token_and_seq_mean():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])  # 99 = padding, must be ignored
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # token_mean: (1 + 2 + 3 + 4) / 4 = 2.5 ; seq_mean: (6/3 + 4/1) / 2 = 3
    assert aggregate(per_token, mask, 4.0, "token_mean").item() == pytest.approx(2.5)
    assert aggregate(per_token, mask, 2.0, "seq_mean").item() == pytest.approx(3.0)


# Shared MIS-PO example: row 0 has 3 generated tokens (middle one rejected), row 1 a single token + padding.
LOGP = [[-1.0, -2.0, -1.5], [-2.0, float("-inf"), float("nan")]]  # padding holds garbage on purpose
ADV = torch.tensor([[2.0, 2.0, 2.0], [0.5, 0.5, 0.5]])
MASK = torch.tensor([[True, False, True], [True, False, False]])  # tokens that train
LOSS_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_mispo_loss_token_mean_value_and_grad():
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, _ = mispo_loss(logp, ADV, MASK, LOSS_MASK, normalizer=4.0)
    # per token -A * logp on accepted tokens: row 0 [2, (rejected) 0, 3], row 1 [1]; sum 6 over 4 tokens
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    # d/dlogp = -A / 4 on accepted tokens, exactly 0 on the rejected token and the padding
    expected = torch.tensor([[-0.5, 0.0, -0.5], [-0.125, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=0)


def test_mispo_loss_seq_mean():
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, _ = mispo_loss(logp, ADV, MASK, LOSS_MASK, normalizer=2.0, loss_norm="seq_mean")
    # row 0: (2 + 0 + 3) / 3 generated tokens = 5/3 ; row 1: 1 / 1 = 1 ; (5/3 + 1) / 2 = 4/3
    assert loss.item() == pytest.approx(4 / 3)
    loss.backward()
    # row 0 accepted: -2 / (3 * 2) = -1/3 ; row 1: -0.5 / (1 * 2) = -0.25
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, 0.0, -1 / 3], [-0.25, 0.0, 0.0]]))


def test_mispo_all_rejected_is_zero_with_zero_grads():
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, _ = mispo_loss(logp, ADV, torch.zeros_like(MASK), LOSS_MASK, normalizer=4.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros(2, 3))


# PPO-clip example, one row of 4 tokens, old_logp = 0 so that r_t = exp(logp_t).
RATIOS = [1.5, 0.5, 1.1, 0.7]
PPO_ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0]])


def test_ppo_clip_loss_value_grad_and_clip_frac():
    logp = torch.tensor([[L(r) for r in RATIOS]], requires_grad=True)
    ones = torch.ones(1, 4, dtype=torch.bool)
    loss, metrics = ppo_clip_loss(logp, torch.zeros(1, 4), PPO_ADV, ones, ones, normalizer=4.0, clip_eps=0.2)
    # t0: r 1.5, A +1: max(-1.5, -1.2) = -1.2  clipped
    # t1: r 0.5, A +1: max(-0.5, -0.8) = -0.5
    # t2: r 1.1, A -1: max( 1.1,  1.1) =  1.1
    # t3: r 0.7, A -1: max( 0.7,  0.8) =  0.8  clipped
    # (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05
    assert loss.item() == pytest.approx(0.05, abs=1e-6)
    assert metrics["actor/clip_frac"] == pytest.approx(0.5)
    loss.backward()
    # d(-A r)/dlogp = -A r: t1 -0.5/4 = -0.125, t2 1.1/4 = 0.275; clipped tokens 0
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.125, 0.275, 0.0]]))


def test_ppo_clip_with_tis_weight():
    logp = torch.tensor([[L(r) for r in RATIOS]])
    rollout = -torch.tensor([[L(3.0), L(0.5), 0.0, 0.0]])  # pi_old / pi_rollout = [3, 0.5, 1, 1]
    w = tis_weights(torch.zeros(1, 4), rollout, torch.ones(1, 4), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 1.0, 1.0]]))  # 3 truncated to the cap 2
    ones = torch.ones(1, 4, dtype=torch.bool)
    loss, metrics = ppo_clip_loss(logp, torch.zeros(1, 4), PPO_ADV, ones, ones, 4.0, tis_weight=w)
    # (-1.2 * 2 - 0.5 * 0.5 + 1.1 + 0.8) / 4 = -0.75 / 4 = -0.1875
    assert loss.item() == pytest.approx(-0.1875, abs=1e-6)
    assert metrics["actor/tis_weight_mean"] == pytest.approx(1.125)


def test_gspo_loss_sequence_ratio_and_clip():
    # row 0: logp [log 2, log 0.5] vs old 0 -> s = exp((log 2 + log 0.5) / 2) = 1, A = +1 -> inside the clip
    # row 1: single token logp log 0.5 -> s = 0.5, A = -1: max(0.5, 0.9999) = 0.9999, clipped (no grad)
    logp = torch.tensor([[L(2.0), L(0.5)], [L(0.5), 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    loss_mask = torch.tensor([[1, 1], [1, 0]])
    loss, metrics = gspo_loss(logp, torch.zeros(2, 2), adv, loss_mask.bool(), loss_mask, 3.0, clip_eps=1e-4)
    # token_mean: (-1 - 1 + 0.9999) / 3 = -0.333367
    assert loss.item() == pytest.approx(-1.0001 / 3, abs=1e-6)
    assert metrics["actor/clip_frac"] == pytest.approx(1 / 3)
    loss.backward()
    # row 0 each token: -A * s / 3 = -1/3 ; row 1 clipped: 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [0.0, 0.0]]))


def test_gspo_seq_mean_gradient_is_gspo_sequence_gradient():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 4)).requires_grad_()
    old = logp.detach() + 0.05 * torch.randn(3, 4)
    adv = torch.tensor([1.0, -0.5, 2.0])[:, None].expand(3, 4)
    loss_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    loss, _ = gspo_loss(logp, old, adv, loss_mask.bool(), loss_mask, 3.0, clip_eps=10.0, loss_norm="seq_mean")
    loss.backward()
    # with the clip out of reach GSPO is -(1/N) sum_i A_i s_i, s_i = exp(mean_t (logp - old) over row i)
    ref_logp = logp.detach().clone().requires_grad_()
    m = loss_mask.bool()
    log_s = torch.where(m, ref_logp - old, 0.0).sum(-1) / m.sum(-1)
    ref = -(adv[:, 0] * log_s.exp()).sum() / 3.0
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logp.grad, ref_logp.grad)


def test_kl_penalty_value_and_grad():
    # t0: theta = old = 0.5, ref = 0.25 -> ratio 1, r = ref/theta = 0.5: 0.5 - log 0.5 - 1 = 0.193147
    # t1: theta = ref = 0.4, old = 0.5 -> r = 1: 1 - 0 - 1 = 0
    logp = torch.tensor([[L(0.5), L(0.4)]], requires_grad=True)
    old, ref = torch.tensor([[L(0.5), L(0.5)]]), torch.tensor([[L(0.25), L(0.4)]])
    ones = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = kl_penalty(logp, old, ref, ones, ones, 2.0)
    assert loss.item() == pytest.approx(0.193147 / 2, abs=1e-6)
    assert metrics["actor/kl"] == pytest.approx(0.193147 / 2, abs=1e-6)
    loss.backward()
    # d/dlogp [ratio * f(r)] = ratio * (f(r) - r + 1): t0 1 * (0.193147 + 0.5) = log 2 ; t1 0.8 * 0 = 0 ; / 2
    torch.testing.assert_close(logp.grad, torch.tensor([[L(2.0) / 2, 0.0]]))


def test_kl_penalty_is_unbiased_over_a_categorical():
    # sum_a pi_old(a) * kl(a) over all outcomes a equals KL(pi_theta || pi_ref) exactly, and so do the grads
    torch.manual_seed(0)
    logits = torch.randn(5, requires_grad=True)
    theta = torch.log_softmax(logits, -1)
    old = torch.log_softmax(torch.randn(5), -1)
    ref = torch.log_softmax(torch.randn(5), -1)
    one = torch.ones(1, 1, dtype=torch.bool)
    per_outcome = [
        kl_penalty(theta[a].view(1, 1), old[a].view(1, 1), ref[a].view(1, 1), one, one, 1.0)[0]
        for a in range(5)
    ]
    estimate = (old.exp() * torch.stack(per_outcome)).sum()
    exact = (theta.exp() * (theta - ref)).sum()
    torch.testing.assert_close(estimate, exact)
    g_est = torch.autograd.grad(estimate, logits, retain_graph=True)[0]
    g_exact = torch.autograd.grad(exact, logits)[0]
    torch.testing.assert_close(g_est, g_exact)


def test_critic_loss():
    values = torch.tensor([[0.5, 1.0, 123.0]], requires_grad=True)  # 123 = padding
    loss, metrics = critic_loss(values, torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1, 1, 0]]), 2.0)
    # ((0.5 - 1)^2 + 0) / 2 = 0.125 ; grad 2 * (0.5 - 1) / 2 = -0.5
    assert loss.item() == pytest.approx(0.125)
    assert metrics["critic/mse"] == pytest.approx(0.125)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[-0.5, 0.0, 0.0]]))


@pytest.mark.parametrize("fn", ["mispo", "ppo", "gspo"])
def test_garbage_padding_never_makes_nan(fn):
    logp = torch.tensor([[-1.0, float("-inf")], [float("nan"), float("inf")]], requires_grad=True)
    old = torch.tensor([[-1.1, float("nan")], [float("-inf"), 0.0]])
    adv = torch.ones(2, 2)
    loss_mask = torch.tensor([[1, 0], [0, 0]])
    if fn == "mispo":
        loss, _ = mispo_loss(logp, adv, loss_mask.bool(), loss_mask, 1.0)
    elif fn == "ppo":
        loss, _ = ppo_clip_loss(logp, old, adv, loss_mask.bool(), loss_mask, 1.0)
    else:
        loss, _ = gspo_loss(logp, old, adv, loss_mask.bool(), loss_mask, 1.0, clip_eps=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[0, 1] == 0 and (logp.grad[1] == 0).all()
