"""Which rows of a mini-batch carry learning signal, and when leaving the others out is exact.

A row whose every trainable token has advantage 0 (and no KL term) has policy loss 0 at every theta: each
loss is `where(mask, f(A, ...), 0)` with f = 0 and df/dtheta = 0 at A = 0, and the KL term is masked too.
Its gradient is exactly 0, so the learner runs no backward for it (step.accumulate_minibatch).
"""

from __future__ import annotations

import torch

from rlstack.learner.batch import PolicyBatch
from rlstack.learner.config import MoEConfig
from rlstack.mispo import AlgorithmConfig


def skip_is_exact(moe: MoEConfig | None, *, probe: bool, model: object = None) -> bool:
    """Whether rows without learning signal (`signal_rows` False) may skip the backward with the update
    unchanged. Not on a routing-probe step (it measures every row's training forward), with a MoE balancing
    loss or router-bias update (both depend on the routing of every token in the forward, signal or not),
    or when `model` draws dropout masks (the remaining rows would draw different ones)."""
    if probe or uses_dropout(model):
        return False
    return moe is None or (moe.balance_coef == 0.0 and moe.bias_update_rate == 0.0)


def uses_dropout(model: object) -> bool:
    """Whether `model` (an nn.Module; a DeepSpeed engine is one) may draw dropout masks: a dropout module
    with p > 0 (LoRA's `lora_dropout` too) or a config value `*dropout` / `*pdrop` above 0 (transformers'
    functional attention dropout)."""
    if not isinstance(model, torch.nn.Module):
        return False
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0.0:
            return True
        config = getattr(module, "config", None)
        if config is not None and any(
            key.endswith(("dropout", "pdrop")) and isinstance(value, int | float) and value > 0.0
            for key, value in getattr(config, "__dict__", {}).items()
        ):
            return True
    return False


def trainable_tokens(batch: PolicyBatch, algo_cfg: AlgorithmConfig) -> torch.Tensor:
    """(B, L) bool: the tokens that may train, known before the forward: loss mask, finite pi_old (when the
    batch has it), and the batch's MIS masks where they apply. A superset of `compute_policy_loss`'s mask
    (which also needs finite pi_theta and pi_ref), so a token outside it never trains."""
    mask = batch.loss_mask.bool()  # (B, L)
    if batch.old_logp is not None:
        mask = mask & torch.isfinite(batch.old_logp)
    if batch.filter is not None and (algo_cfg.name == "mispo" or algo_cfg.baseline_mis_masks):
        mask = mask & batch.filter.combined.bool()
    return mask


def signal_rows(batch: PolicyBatch, algo_cfg: AlgorithmConfig) -> torch.Tensor:
    """(B,) bool: rows with a token that can move the weights, from the masks alone: a trainable token with
    a nonzero advantage, or (KL on) any trainable token. A NaN advantage counts as signal."""
    assert batch.advantages is not None, "needs advantages in the batch"
    signal = trainable_tokens(batch, algo_cfg)  # (B, L)
    if algo_cfg.kl_coef == 0.0:
        adv = batch.advantages  # (B, L) or (B,)
        signal &= (adv[:, None] if adv.dim() == 1 else adv) != 0
    return signal.any(-1)
