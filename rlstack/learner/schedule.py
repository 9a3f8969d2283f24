"""Learning-rate schedules: linear warm-up, then constant, linear or cosine decay, by optimizer step.

rlstack sets the learning rate itself before every optimizer step (`lr_at`), instead of a DeepSpeed
scheduler, so that one function owns it: the step counter lives in the learner's checkpoint (exact
resume), the critic reuses the schedule with its own base rate, and a step without learning signal can
run at lr 0 without the scheduler and that override fighting over `param_groups`.

    >>> from rlstack.learner.config import LearnerConfig
    >>> cfg = LearnerConfig(lr=1.0, lr_schedule="linear", warmup_steps=2, lr_decay_steps=6)
    >>> [round(lr_at(s, 1.0, cfg), 3) for s in range(7)]
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
"""

from __future__ import annotations

import math

from rlstack.learner.config import LearnerConfig


def lr_at(step: int, base_lr: float, cfg: LearnerConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) for a schedule peaking at `base_lr`.

    Warm-up: step s < W uses base * (s + 1) / W. Then with D = `lr_decay_steps` (the step at which decay
    ends; None = never decays) and m = base * `min_lr_ratio`, progress p = (s - W) / (D - W) in [0, 1]:
    constant -> base; linear -> m + (base - m) * (1 - p); cosine -> m + (base - m) * (1 + cos(pi p)) / 2.
    Past D the rate stays at m.
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if cfg.lr_schedule == "constant" or cfg.lr_decay_steps is None:
        return base_lr
    floor = base_lr * cfg.min_lr_ratio
    span = max(cfg.lr_decay_steps - warmup, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    if cfg.lr_schedule == "linear":
        return floor + (base_lr - floor) * (1.0 - progress)
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
