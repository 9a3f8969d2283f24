"""The learner's optimizer steps: the one check of a training batch, the LR schedule with the no-signal
lr-0 rule, and the typed result of a train step.

Two ways to get pi_old (the driver picks one, `Trainer.step`): a separate `compute_logprobs` pass before
the step (`batch.old_logp` set, any filter), or the training forward itself (`old_logp_from_forward`: one
mini-batch, a stateless trajectory filter, neither `old_logp` nor `filter` passed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlstack.learner.batch import PolicyBatch
from rlstack.learner.config import LearnerConfig
from rlstack.learner.critic import check_critic_inputs
from rlstack.learner.moe import health_metrics
from rlstack.learner.schedule import lr_at
from rlstack.learner.step import COUNTED, MetricSums, Reducer, old_logp_from_forward_is_exact, probe_metrics
from rlstack.mispo import AlgorithmConfig


@dataclass
class TrainResult:
    """What one train step returns: global metrics and, when pi_old came from the training forward, pi_old
    of the step's rows (B, L) in batch order (None when the batch brought `old_logp`)."""

    metrics: dict[str, float]
    old_logp: torch.Tensor | None = None


def check_train_batch(
    batch: PolicyBatch,
    algo_cfg: AlgorithmConfig,
    cfg: LearnerConfig,
    *,
    old_logp_from_forward: bool,
    has_reference: bool,
) -> None:
    """The one validation of a train step's whole batch (raises ValueError saying what to set)."""
    if batch.advantages is None:
        raise ValueError("train: batch.advantages is None; set them (rlstack.mispo.compute_advantages)")
    check_critic_inputs(batch, enabled=cfg.critic.enabled)
    if algo_cfg.kl_coef > 0.0 and not has_reference and batch.ref_logp is None:
        raise ValueError(
            f"algorithm.kl_coef = {algo_cfg.kl_coef} needs the frozen reference policy: build the "
            "LearnerGroup with reference_path= (the run's initial policy)"
        )
    if cfg.n_minibatches > len(batch):
        raise ValueError(
            f"learner.n_minibatches = {cfg.n_minibatches} but the batch has only {len(batch)} rows"
        )
    if old_logp_from_forward:
        if batch.old_logp is not None or batch.filter is not None:
            raise ValueError("pi_old from the training forward computes pi_old and the filter: pass neither")
        if not old_logp_from_forward_is_exact(cfg.n_minibatches, algo_cfg):
            raise ValueError(
                "pi_old from the training forward needs learner.n_minibatches 1 (got "
                f"{cfg.n_minibatches}) and a stateless algorithm.traj_filter, 'fixed' or 'off' (got "
                f"'{algo_cfg.traj_filter}'); compute pi_old first (compute_logprobs)"
            )
        return
    if batch.old_logp is None:
        raise ValueError("train: batch.old_logp is None; compute pi_old first (compute_logprobs(batch))")
    uses_mis = algo_cfg.name == "mispo" or algo_cfg.baseline_mis_masks
    # a stateless filter without batch.filter is computed per micro-batch (mispo.compute_policy_loss)
    if batch.filter is None and uses_mis and not algo_cfg.traj_filter_is_stateless:
        raise ValueError(
            f"algorithm.traj_filter = '{algo_cfg.traj_filter}' is stateful: pass the step's "
            "MISFilter(cfg)(old_logp, rollout_logp, loss_mask) result as batch.filter"
        )


Accumulate = Callable[[PolicyBatch], MetricSums]  # one mini-batch's forward/backward -> its metric sums


def optimize(
    engine: Any,
    minibatches: list[PolicyBatch],
    accumulate: Accumulate,
    *,
    cfg: LearnerConfig,
    base_lr: float,
    first_step: int,
    reducer: Reducer,
    summed: tuple[str, ...],
    prefix: str,
    has_signal: Callable[[MetricSums], bool] | None = None,
    after_step: Callable[[MetricSums], None] | None = None,
    moe_layer_ids: Sequence[int] = (),
) -> dict[str, float]:
    """One optimizer step of `engine` per mini-batch (`accumulate(shard)` fills the gradients); global
    metrics with the mean of the mini-batch losses, grad norm and lr.

    The learning rate of each step comes from the schedule (`schedule.lr_at` of `base_lr`, by optimizer
    step, counting from `first_step`). A mini-batch without learning signal (`has_signal(stats)` False
    after its forward: no trained token with a nonzero advantage and no KL term, so the gradient is
    exactly 0) steps with learning rate 0. Adam would otherwise still move every weight by its momentum,
    and a run of zero-reward batches (sparse rewards) drifts the policy with no signal.

    `after_step(stats)` runs after each optimizer step with that mini-batch's local sums (the router-bias
    update). MoE routing facts in the sums become expert-health metrics (learner.moe), layers named by
    `moe_layer_ids`."""
    engine.train()
    total = MetricSums()
    grad_norms, lrs = [], []
    frozen = 0
    for i, shard in enumerate(minibatches):
        stats = accumulate(shard)
        freeze = has_signal is not None and not has_signal(stats)
        lr = lr_at(first_step + i, base_lr, cfg)
        lrs.append(lr)
        pre_norm = grad_norm(engine) if cfg.zero_stage == 0 else None
        set_lr(engine.optimizer, 0.0 if freeze else lr)
        engine.step()
        frozen += freeze
        norm = engine.get_global_grad_norm()
        if norm is None:
            if pre_norm is None:
                raise RuntimeError(f"DeepSpeed recorded no gradient norm (ZeRO stage {cfg.zero_stage})")
            norm = pre_norm
        grad_norms.append(float(norm))
        if after_step is not None:
            after_step(stats)
        total.merge(stats)
    reduced = total.all_reduce(reducer)
    metrics = reduced.result()
    metrics |= probe_metrics(metrics)
    if "moe/expert_tokens" in reduced.arrays:
        metrics |= health_metrics(reduced.arrays, moe_layer_ids)
    for k in summed:  # mean of the mini-batch losses
        if k in metrics and k not in COUNTED:
            metrics[k] /= len(minibatches)
    metrics |= {
        f"{prefix}/grad_norm": sum(grad_norms) / len(grad_norms),
        f"{prefix}/lr": sum(lrs) / len(lrs),
    }
    if has_signal is not None:
        metrics[f"{prefix}/frozen_steps"] = float(frozen)
    return metrics


def grad_norm(engine: Any) -> float:
    """Global 2-norm of the (already all-reduced) gradients; ZeRO-0 does not record it."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def set_lr(optimizer: Any, lr: float) -> None:
    """The learning rate of the next optimizer step. At 0 AdamW changes no weight (its update and its
    decoupled decay both scale with lr), which is how a step without learning signal runs."""
    for group in optimizer.param_groups:
        group["lr"] = lr
