"""The learning-rate schedule (rlstack.learner.schedule), with values worked out by hand."""

from __future__ import annotations

import math

import pytest

from rlstack.config import RunConfig
from rlstack.learner.config import LearnerConfig
from rlstack.learner.schedule import lr_at


def test_constant_with_warmup() -> None:
    cfg = LearnerConfig(lr=0.1, warmup_steps=4)
    # warm-up: 0.1 * (s + 1) / 4 for s = 0..3, then constant
    assert [lr_at(s, 0.1, cfg) for s in range(6)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_linear_decay_to_a_floor() -> None:
    cfg = LearnerConfig(lr=1.0, lr_schedule="linear", lr_decay_steps=4, min_lr_ratio=0.2)
    # p = s / 4: 0.2 + 0.8 * (1 - p) -> 1.0, 0.8, 0.6, 0.4, 0.2, and 0.2 past the end
    assert [lr_at(s, 1.0, cfg) for s in range(6)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])


def test_cosine_after_warmup() -> None:
    cfg = LearnerConfig(lr=2.0, lr_schedule="cosine", warmup_steps=1, lr_decay_steps=5)
    # s = 0 warm-up: 2.0; then p = (s - 1) / 4: 2.0 * (1 + cos(pi p)) / 2
    expected = [2.0] + [1.0 + math.cos(math.pi * p / 4) for p in range(5)]
    assert [lr_at(s, 2.0, cfg) for s in range(6)] == pytest.approx(expected)
    assert lr_at(3, 2.0, cfg) == pytest.approx(1.0)  # halfway: half the rate


def test_run_config_decays_over_the_whole_run_by_default() -> None:
    cfg = RunConfig.model_validate(
        {"trainer": {"steps": 50}, "learner": {"lr_schedule": "cosine", "n_minibatches": 2}}
    )
    assert cfg.learner.lr_decay_steps == 100  # one optimizer step per mini-batch per RL step
    assert RunConfig().learner.lr_decay_steps is None  # constant: nothing to fill in
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        LearnerConfig(warmup_steps=10, lr_decay_steps=5)
