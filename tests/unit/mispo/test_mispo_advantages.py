"""Group-normalised and critic advantages. Expected values by hand."""

import math

import pytest
import torch

from rlstack.mispo import AlgorithmConfig, compute_advantages, critic_advantages, group_advantages

S2 = 1 / math.sqrt(2.0)


def test_group_advantages_with_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_ids=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), eps=0.0)
    # group 0: mean 0.25, unbiased var = (0.75^2 + 3 * 0.25^2) / 3 = 0.25 -> std 0.5
    #   A = [0.75, -0.25, -0.25, -0.25] / 0.5 = [1.5, -0.5, -0.5, -0.5]
    # group 1: all rewards equal -> A = 0 exactly
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0]))


def test_group_advantages_eps_and_no_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # eps = 1e-6: 0.75 / (0.5 + 1e-6) = 1.499997
    assert group_advantages(rewards, group_size=4)[0].item() == pytest.approx(1.499997, abs=1e-6)
    # no std: A = R - mean = [0.75, -0.25, -0.25, -0.25]
    no_std = group_advantages(rewards, group_size=4, use_std=False)
    torch.testing.assert_close(no_std, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_group_ids_need_not_be_contiguous():
    # group 7 = rows 0, 2 with rewards [2, 4]: mean 3, std = sqrt((1 + 1) / 1) = sqrt 2 -> A = -+1/sqrt 2
    # group 3 = rows 1, 3 with rewards [5, 5]: zero variance -> 0
    adv = group_advantages(torch.tensor([2.0, 5.0, 4.0, 5.0]), group_ids=torch.tensor([7, 3, 7, 3]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-S2, 0.0, S2, 0.0]))


def test_contiguous_group_size():
    # groups [1, 3] and [2, 2]: A = [-1/sqrt 2, 1/sqrt 2] and [0, 0]
    adv = group_advantages(torch.tensor([1.0, 3.0, 2.0, 2.0]), group_size=2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-S2, S2, 0.0, 0.0]))


def test_zero_variance_and_singleton_groups_never_nan():
    # float rewards whose mean is not exactly representable still give exactly 0
    adv = group_advantages(torch.tensor([0.1, 0.1, 0.1, 0.7]), group_ids=torch.tensor([0, 0, 0, 1]))
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert not torch.isnan(group_advantages(torch.tensor([3.0]), group_size=1)).any()


def test_group_argument_errors():
    r = torch.zeros(4)
    with pytest.raises(ValueError, match="exactly one"):
        group_advantages(r)
    with pytest.raises(ValueError, match="exactly one"):
        group_advantages(r, group_ids=torch.zeros(4), group_size=2)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, group_size=3)
    with pytest.raises(ValueError, match="expected \\(4,\\)"):
        group_advantages(r, group_ids=torch.zeros(3))


def test_critic_advantages_with_truncation_bootstrap():
    rewards = torch.tensor([1.0, 0.0])
    # values (B, T + 1): V(s_t) at t = 0..3 and, in the extra column, the state after the last token
    values = torch.tensor([[0.2, 0.5, 0.9, 7.0, 8.0], [0.1, 0.3, 0.4, 0.6, 0.55]])
    loss_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    truncated = torch.tensor([False, True])
    adv, ret = critic_advantages(rewards, values, loss_mask, truncated)
    # row 0 finished: R = 1, A_t = 1 - V = [0.8, 0.5, 0.1], padding 0 (its values 7, 8 are ignored)
    # row 1 hit the length limit: R = V(s_T) = 0.55, the state AFTER its last token (t = 3), not
    # V(s_3) = 0.6, the state before it; A = 0.55 - V = [0.45, 0.25, 0.15, -0.05]
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.55, 0.55, 0.55, 0.55]]))
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.5, 0.1, 0.0], [0.45, 0.25, 0.15, -0.05]]))


def test_critic_values_need_the_state_after_the_last_token():
    with pytest.raises(ValueError, match=r"\(B, T \+ 1\)"):
        critic_advantages(torch.ones(1), torch.zeros(1, 4), torch.ones(1, 4), torch.tensor([True]))


def test_critic_bootstrap_uses_last_generated_token_not_tool_output():
    # multi-turn: a tool-output token (mask 0) at t = 3 after the last generated token at t = 2
    values = torch.tensor([[0.1, 0.2, 0.3, 0.9, 0.4]], requires_grad=True)
    adv, ret = critic_advantages(
        torch.tensor([5.0]), values, torch.tensor([[1, 0, 1, 0]]), torch.tensor([True])
    )
    # R = V(state after the token at t = 2) = values[3] = 0.9 -> A = [0.9 - 0.1, 0, 0.9 - 0.3, 0]
    torch.testing.assert_close(ret, torch.tensor([[0.9, 0.0, 0.9, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.0, 0.6, 0.0]]))
    assert not adv.requires_grad and not ret.requires_grad


def test_unscored_samples_leave_their_group_statistics():
    # group 0 = [1, 0, NaN, 0]: the NaN (unscored) sample is left out: mean 1/3, unbiased var
    # ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3 -> std 0.57735; A = [1.1547, -0.57735, 0, -0.57735]
    # group 1 = [NaN, NaN]: nothing scored -> 0, not NaN
    rewards = torch.tensor([1.0, 0.0, float("nan"), 0.0, float("nan"), float("nan")])
    adv = group_advantages(rewards, group_ids=torch.tensor([0, 0, 0, 0, 1, 1]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.154701, -0.577350, 0.0, -0.577350, 0.0, 0.0]))
    # the scored members get exactly what the group without the unscored sample would give them
    alone = group_advantages(torch.tensor([1.0, 0.0, 0.0]), group_size=3, eps=0.0)
    torch.testing.assert_close(adv[[0, 1, 3]], alone)


def test_compute_advantages_dispatch():
    loss_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv, ret = compute_advantages(AlgorithmConfig(), torch.tensor([1.0, 0.0]), loss_mask, group_size=2)
    # one group [1, 0]: mean 0.5, std sqrt(0.5) -> A = +-0.5 / 0.7071068 = +-0.7071, broadcast over tokens
    torch.testing.assert_close(adv, torch.tensor([[S2, S2, 0.0], [-S2, 0.0, 0.0]]), atol=1e-5, rtol=0)
    assert ret is None
    critic = AlgorithmConfig(advantage="critic")
    with pytest.raises(ValueError, match="critic"):
        compute_advantages(critic, torch.tensor([1.0, 0.0]), loss_mask)
    adv, ret = compute_advantages(
        critic, torch.tensor([1.0, 0.0]), loss_mask, values=torch.full((2, 4), 0.25), truncated=torch.zeros(2)
    )
    torch.testing.assert_close(adv, torch.tensor([[0.75, 0.75, 0.0], [-0.25, 0.0, 0.0]]))
