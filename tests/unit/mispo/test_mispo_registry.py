"""Registry and compute_policy_loss: dispatch, masks, gradients, metrics, errors, import hygiene."""

import math

import pytest
import torch

from rlstack.mispo import (
    AlgorithmConfig,
    MISFilter,
    compute_policy_loss,
    get_policy_loss,
    loss_normalizer,
    policy_loss_names,
    register_policy_loss,
)


def test_registry_names_duplicates_and_unknown():
    assert policy_loss_names() == ["grpo", "gspo", "mispo", "ppo"]
    with pytest.raises(ValueError, match="'mispo' is already registered"):
        register_policy_loss("mispo")(lambda inp, cfg: (torch.zeros(()), {}))
    with pytest.raises(
        ValueError, match="unknown policy loss 'reinforce'; registered: grpo, gspo, mispo, ppo"
    ):
        get_policy_loss("reinforce")


def _batch():
    """2 rows, T = 3. Row 0: token 1 has x = pi_old / pi_rollout = 3 (rejected); row 1: 1 token + padding."""
    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]])
    rollout = old - torch.tensor([[0.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0]])
    loss_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return old, rollout, loss_mask


def test_mispo_gradient_rejected_zero_accepted_plain_policy_gradient():
    old, rollout, loss_mask = _batch()
    logp = old.clone().requires_grad_()
    adv = torch.tensor([2.0, -1.0])  # (B,) is broadcast over tokens
    cfg = AlgorithmConfig(traj_filter="off")
    norm = loss_normalizer(loss_mask, cfg.loss_norm)  # 4 generated tokens
    loss, metrics = compute_policy_loss(cfg, logp, old, rollout, adv, loss_mask, norm)
    loss.backward()
    # accepted: -A / normalizer = -2/4 and +1/4 ; rejected token (x = 3) and padding: exactly 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, 0.0, -0.5], [0.25, 0.0, 0.0]]), rtol=0, atol=0)
    # loss = -(2 * -1 + 2 * -1 + (-1) * -2) / 4 = (2 + 2 - 2) / 4 = 0.5
    assert loss.item() == pytest.approx(0.5)
    assert metrics["actor/loss"] == pytest.approx(0.5)
    assert metrics["actor/train_frac"] == pytest.approx(3 / 4)
    assert metrics["filter/token_accept"] == pytest.approx(3 / 4)


def test_fixed_traj_band_rejects_whole_trajectory():
    old, rollout, loss_mask = _batch()
    logp = old.clone().requires_grad_()
    # row 0: log rho = log 3 / 3 = 0.366 -> rho = 1.44 > 1.001: all its tokens drop; row 1: rho = 1 stays
    loss, metrics = compute_policy_loss(
        AlgorithmConfig(), logp, old, rollout, torch.tensor([2.0, -1.0]), loss_mask, 4.0
    )
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.0, 0.0]]), rtol=0, atol=0)
    assert metrics["filter/traj_accept"] == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["mispo", "grpo", "gspo", "ppo"])
def test_all_tokens_rejected_gives_zero_loss_and_zero_grads(name):
    old, _, loss_mask = _batch()
    rollout = old - 5.0  # x = e^5 on every token
    logp = (old + 0.1).requires_grad_()
    cfg = AlgorithmConfig(name=name, baseline_mis_masks=True, kl_coef=0.001)
    loss, metrics = compute_policy_loss(
        cfg, logp, old, rollout, torch.tensor([1.0, -1.0]), loss_mask, 4.0, ref_logp=old - 0.2
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros(2, 3))
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["filter/combined_accept"] == 0.0


def test_baselines_ignore_mis_masks_unless_asked():
    old, rollout, loss_mask = _batch()
    adv = torch.tensor([1.0, 1.0])
    for use_masks, expected_frac in [(False, 1.0), (True, 0.25)]:
        cfg = AlgorithmConfig(name="grpo", baseline_mis_masks=use_masks)
        _, metrics = compute_policy_loss(cfg, old.clone(), old, rollout, adv, loss_mask, 4.0)
        assert metrics["actor/train_frac"] == pytest.approx(expected_frac)
        assert metrics["actor/clip_frac"] == 0.0  # theta == old: ratio 1, nothing clipped


def test_metrics_kl_entropy_and_types():
    old, rollout, loss_mask = _batch()
    cfg = AlgorithmConfig(name="ppo", traj_filter="off", kl_coef=0.001, tis_cap=2.0)
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    _, metrics = compute_policy_loss(
        cfg,
        old.clone().requires_grad_(),
        old,
        rollout,
        torch.ones(2, 3),
        loss_mask,
        4.0,
        ref_logp=old,
        entropy=entropy,
    )
    assert metrics["actor/entropy"] == pytest.approx(2.5)  # (1 + 2 + 3 + 4) / 4, padding ignored
    assert metrics["actor/kl"] == 0.0  # theta == ref
    assert {"actor/clip_frac", "actor/tis_weight_mean", "filter/log_ratio_p95", "actor/pg_loss"} <= set(
        metrics
    )
    assert all(type(v) is float for v in metrics.values())


def test_errors_are_explicit():
    old, rollout, loss_mask = _batch()
    adv = torch.ones(2)
    with pytest.raises(ValueError, match="MISFilter"):
        compute_policy_loss(AlgorithmConfig(traj_filter="adaptive"), old, old, rollout, adv, loss_mask, 4.0)
    with pytest.raises(ValueError, match="ref_logp"):
        compute_policy_loss(AlgorithmConfig(kl_coef=0.001), old, old, rollout, adv, loss_mask, 4.0)
    with pytest.raises(ValueError, match="rollout_logp has shape \\(2, 2\\)"):
        compute_policy_loss(AlgorithmConfig(), old, old, rollout[:, :2], adv, loss_mask, 4.0)


def test_adaptive_filter_result_is_used():
    old, rollout, loss_mask = _batch()
    cfg = AlgorithmConfig(traj_filter="adaptive")
    fr = MISFilter(cfg)(old, rollout, loss_mask)
    _, metrics = compute_policy_loss(
        cfg, old.clone(), old, rollout, torch.ones(2), loss_mask, 4.0, filter_result=fr
    )
    assert metrics["filter/traj_band_hi"] == pytest.approx(fr.metrics["filter/traj_band_hi"])


def test_a_step_moves_parameters_towards_positive_advantage():
    torch.manual_seed(0)
    logits = torch.zeros(4, requires_grad=True)
    actions = torch.tensor([[0, 1, 2]])
    logp = torch.log_softmax(logits, -1)[actions]  # (1, 3)
    adv = torch.tensor([[1.0, -1.0, 0.0]])
    ones = torch.ones(1, 3)
    loss, _ = compute_policy_loss(AlgorithmConfig(), logp, logp.detach(), logp.detach(), adv, ones, 3.0)
    loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    probs = torch.softmax(logits, -1)
    assert probs[0] > 0.25 > probs[1]


def test_lazy_exports_match_all():
    import rlstack.mispo as m

    assert sorted(m._MODULE_OF) == sorted(m.__all__)


def test_import_pulls_no_ray_vllm_deepspeed_and_config_no_torch(fresh_python):
    code = (
        "import sys\n"
        "from rlstack.mispo import AlgorithmConfig\n"
        "AlgorithmConfig(name='gspo')\n"
        "assert 'torch' not in sys.modules, 'config import loaded torch'\n"
        "import rlstack.mispo as m\n"
        "for name in m.__all__: getattr(m, name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in {'ray', 'vllm', 'deepspeed'})\n"
        "assert not bad, bad\n"
    )
    proc = fresh_python(code)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["mispo", "grpo", "gspo", "ppo"])
def test_tokens_outside_the_learners_support_never_train_and_give_finite_gradients(name: str) -> None:
    """With top-k/top-p the learner gives a sampled token outside its own support log-prob -inf (pi_theta
    and pi_old alike). Such a token is out of every loss (no MIS filter needed), counted, and neither the
    loss nor the gradient of any other token becomes NaN, with the KL term on too."""
    cfg = AlgorithmConfig(name=name, traj_filter="off", kl_coef=0.1)
    inf = float("-inf")
    logp = torch.tensor([[-1.0, inf, -2.0], [-0.5, -0.7, inf]], requires_grad=True)  # (B, T)
    old = logp.detach().clone()
    rollout = torch.tensor([[-1.0, -3.0, -2.0], [-0.5, -0.7, -4.0]])
    ref = torch.tensor([[-1.1, -2.9, inf], [-0.4, -0.8, -4.1]])  # the reference may lack a token too
    mask = torch.ones(2, 3)
    adv = torch.tensor([1.0, -1.0])
    loss, metrics = compute_policy_loss(cfg, logp, old, rollout, adv, mask, 6.0, ref_logp=ref)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert metrics["actor/nonfinite_logp_tokens"] == 3.0  # (0, 1), (1, 2) and the reference's (0, 2)
    assert metrics["actor/train_frac"] == pytest.approx(3 / 6)
    assert logp.grad[0, 1] == 0 and logp.grad[1, 2] == 0 and logp.grad[0, 2] == 0
    assert logp.grad[0, 0] != 0 and logp.grad[1, 0] != 0
