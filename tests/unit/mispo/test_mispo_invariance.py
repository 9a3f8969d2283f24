"""Gradient accumulation: one micro-step of 8 rows == 8 accumulated micro-steps of 1 row (loss, grads)."""

import pytest
import torch
from torch import nn

from rlstack.mispo import (
    AlgorithmConfig,
    MISFilter,
    compute_advantages,
    compute_policy_loss,
    loss_normalizer,
)

B, T, V = 8, 6, 11


class TinyPolicy(nn.Module):
    """Logits for each position from the previous token: embedding -> linear, (B, T) ids -> (B, T, V)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.out = nn.Linear(16, V)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(context)))


def _data():
    g = torch.Generator().manual_seed(0)
    context = torch.randint(0, V, (B, T), generator=g)
    actions = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([6, 1, 3, 6, 2, 5, 4, 6])  # single-token response, padding of varied length
    loss_mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    loss_mask[3, 2] = False  # a tool-output token inside a response
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    rewards[4:6] = 1.0  # group 2 has zero reward variance
    # old/rollout/ref log-probs: near the policy so that filters accept some tokens and reject others
    noise = torch.randn(3, B, T, generator=g)
    return context, actions, loss_mask, rewards, noise


CONFIGS = [
    AlgorithmConfig(name="mispo", traj_band=(0.9, 1.1)),
    AlgorithmConfig(
        name="mispo", traj_filter="adaptive", adaptive_log_band_max=0.5, loss_norm="seq_mean", kl_coef=0.001
    ),
    AlgorithmConfig(name="mispo", traj_filter="stochastic", stochastic_tau=0.3, seed=5),
    AlgorithmConfig(name="grpo", tis_cap=2.0, kl_coef=0.001),
    AlgorithmConfig(name="ppo", loss_norm="seq_mean", advantage="critic"),
    AlgorithmConfig(name="gspo", gspo_clip_eps=0.05, baseline_mis_masks=True, traj_filter="off"),  # seq_mean
    AlgorithmConfig(name="gspo", gspo_clip_eps=0.05, loss_norm="token_mean", traj_filter="off"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}-{c.traj_filter}-{c.loss_norm}")
def test_batch_8x1_equals_1x8_accumulation(cfg):
    torch.manual_seed(0)
    policy = TinyPolicy()
    context, actions, loss_mask, rewards, noise = _data()

    def logp_of(rows: slice) -> torch.Tensor:
        logits = policy(context[rows])  # (b, T, V)
        return torch.log_softmax(logits, -1).gather(-1, actions[rows, :, None]).squeeze(-1)  # (b, T)

    with torch.no_grad():
        base = logp_of(slice(None))  # (B, T)
    old_logp = base + 0.05 * noise[0]
    rollout_logp = old_logp + 0.4 * noise[1]
    ref_logp = base + 0.05 * noise[2]
    values = torch.rand(B, T + 1, generator=torch.Generator().manual_seed(1))
    adv, _ = compute_advantages(
        cfg, rewards, loss_mask, group_size=2, values=values, truncated=torch.arange(B) % 3 == 0
    )
    filter_result = MISFilter(cfg)(old_logp, rollout_logp, loss_mask)  # once per step, whole batch
    if cfg.name == "mispo" or cfg.baseline_mis_masks:  # the masks must matter in this example
        assert 0 < filter_result.combined.sum() < loss_mask.sum()
    norm = loss_normalizer(loss_mask, cfg.loss_norm)

    def loss_of(rows: slice) -> torch.Tensor:
        loss, _ = compute_policy_loss(
            cfg,
            logp_of(rows),
            old_logp[rows],
            rollout_logp[rows],
            adv[rows],
            loss_mask[rows],
            norm,
            filter_result=filter_result.select(rows),
            ref_logp=ref_logp[rows],
        )
        return loss

    full = loss_of(slice(None))
    full.backward()
    grads_full = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    total = torch.zeros(())
    for i in range(B):
        micro = loss_of(slice(i, i + 1))
        micro.backward()  # gradients accumulate in .grad
        total = total + micro.detach()

    torch.testing.assert_close(total, full.detach(), rtol=0, atol=1e-6)
    for g_full, p in zip(grads_full, policy.parameters(), strict=True):
        assert g_full.abs().sum() > 0
        torch.testing.assert_close(p.grad, g_full, rtol=0, atol=1e-6)
