"""The critic of the actor-critic variant (docs/algorithm.md): the policy's trunk plus a scalar value head.

Values follow the `PolicyBatch` convention of log-probs: `values[b, t] = V(s_t)`, the value of the state
in which token t was sampled (tokens < t), read from the trunk's hidden state at t - 1; position 0 has no
state before it and holds 0. So `values`, `returns` and `loss_mask` line up with `old_logp` position for
position, as `rlstack.mispo.critic_advantages` expects.

`accumulate_critic_minibatch` is the critic's half of a training step in plain PyTorch, with the same
global normaliser and rank scaling as `step.accumulate_minibatch` (see step.py), so N ranks equal one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlstack.learner.batch import PolicyBatch
from rlstack.learner.micro import MicroSplit
from rlstack.learner.step import GradSink, MetricSums, Reducer, _to, global_normalizer, padded_micro_batches
from rlstack.mispo import critic_loss
from rlstack.mispo.config import LossNorm

# Already divided by the global normaliser: they add up over micro-batches and ranks.
CRITIC_SUMMED = ("critic/loss",)
# Token-weighted moments of the returns and errors: explained variance is built from them, then dropped.
_MOMENTS = ("critic/_ret", "critic/_ret2", "critic/_err", "critic/_err2")


class ValueModel(nn.Module):
    """A causal LM's decoder stack (no LM head; any architecture `rlstack.model.auto` loads) and a linear
    value head: (B, T) ids -> (B, T) values."""

    def __init__(self, trunk: nn.Module, head_seed: int = 0) -> None:
        super().__init__()
        self.model = trunk
        config: Any = trunk.config
        hidden = int(config.hidden_size)
        self.value_head = nn.Linear(hidden, 1)
        # A generator of its own: every rank draws the same head, and the global RNG streams are untouched.
        gen = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            weight = torch.randn(self.value_head.weight.shape, generator=gen) / (hidden + 1)
            self.value_head.weight.copy_(weight)
            self.value_head.bias.zero_()

    @classmethod
    def from_policy(
        cls, path: str | Path, head_seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> ValueModel:
        """The trunk of the causal-LM checkpoint at `path` with a fresh value head."""
        from rlstack.model.auto import load_causal_lm, trunk_of

        policy = load_causal_lm(path, dtype)
        return cls(trunk_of(policy), head_seed).to(dtype)  # the fresh head in the trunk's dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (B, T) -> (B, T) fp32 values V(s_t); column 0 is 0."""
        from rlstack.model.auto import last_hidden_state

        hidden = last_hidden_state(self.model, input_ids, attention_mask)  # (B, T, H)
        values = self.value_head(hidden[:, :-1]).squeeze(-1).float()  # (B, T-1): state t+1 seen at t
        return nn.functional.pad(values, (1, 0))  # (B, T)


def check_critic_inputs(batch: PolicyBatch, enabled: bool) -> None:
    """A critic step needs `batch.returns`, and returns without a critic are a configuration mistake."""
    if enabled and batch.returns is None:
        raise ValueError(
            "learner.critic.enabled but PolicyBatch.returns is None: put the returns of "
            "rlstack.mispo.compute_advantages(..., values=compute_values(batch)) into the batch"
        )
    if not enabled and batch.returns is not None:
        raise ValueError(
            "PolicyBatch.returns is set but learner.critic.enabled is false: enable the critic "
            "(learner.critic.enabled: true) or leave returns unset"
        )
    if batch.returns is not None and batch.returns.shape != batch.loss_mask.shape:
        raise ValueError(
            f"PolicyBatch.returns has shape {tuple(batch.returns.shape)}, expected (B, L) = "
            f"{tuple(batch.loss_mask.shape)} like loss_mask"
        )


def accumulate_critic_minibatch(
    model: nn.Module,
    shard: PolicyBatch,
    loss_norm: LossNorm,
    sink: GradSink,
    reducer: Reducer,
    split: MicroSplit | int,
    device: torch.device | None = None,
) -> MetricSums:
    """Forward/backward the critic's MSE on this rank's rows of one mini-batch into `sink`; returns this
    rank's metric sums (all-reduce them, then `finish_critic_metrics`). Same arithmetic as the policy's
    `accumulate_minibatch`: global normaliser, every rank backpropagates W * loss, inert padding."""
    check_critic_inputs(shard, enabled=True)
    normalizer = global_normalizer(shard, loss_norm, reducer)
    micro = padded_micro_batches(shard, split, reducer)
    stats = MetricSums()
    for i, m in enumerate(micro):
        sink.begin(is_last=i == len(micro) - 1)
        mb = _to(m.batch.trim(), device or torch.device("cpu"))
        assert mb.returns is not None
        values = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask)  # (b, T)
        loss, metrics = critic_loss(values, mb.returns, mb.loss_mask, normalizer, loss_norm)
        sink.backward(loss * reducer.world_size)
        _collect(stats, float(loss.detach()), metrics, values.detach(), mb)
    return stats


def _collect(
    stats: MetricSums, loss: float, metrics: dict[str, float], values: torch.Tensor, mb: PolicyBatch
) -> None:
    """Fold one micro-batch in; every rank adds the same keys in every micro-batch (inert: weight 0)."""
    assert mb.returns is not None
    mask = mb.loss_mask.bool()  # (b, T)
    n_tok = float(mask.sum())
    stats.add("critic/loss", loss)
    for k, v in metrics.items():
        stats.add_weighted(k, v if n_tok else 0.0, n_tok)
    ret = mb.returns.double()[mask]  # (n,)
    err = values.double()[mask] - ret  # (n,)
    for key, x in zip(_MOMENTS, (ret, ret**2, err, err**2), strict=True):
        stats.add_weighted(key, float(x.mean()) if n_tok else 0.0, n_tok)


def finish_critic_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Replace the moment accumulators with `critic/explained_var` = 1 - Var(R - V) / Var(R) (0 when
    the returns are constant) and `critic/return_mean`."""
    ret, ret2, err, err2 = (metrics.pop(k) for k in _MOMENTS)
    var_ret, var_err = ret2 - ret**2, err2 - err**2
    metrics["critic/return_mean"] = ret
    metrics["critic/explained_var"] = 1.0 - var_err / var_ret if var_ret > 1e-12 else 0.0
    return metrics
