"""What one training step measures, besides what its stages return: seconds per stage, the reward
summary over scored samples, response lengths and generation throughput."""

from __future__ import annotations

import time

import torch

from rlstack.types import Rollout


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str) -> StageTimer:
        self._stage = stage
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:  # a stage entered again adds up (dynamic sampling's rounds)
        self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + time.perf_counter() - self._start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()} | {"time/step": sum(self.seconds.values())}


def reward_summary(rewards: list[float | None]) -> dict[str, float]:
    """Reward metrics over the SCORED samples (`reward/mean`, `reward/std`, `reward/accuracy`: > 0.5), and
    the unscored ones counted on their own (`reward/unscored`, `reward/unscored_frac`), never as wrong."""
    scored = torch.tensor([r for r in rewards if r is not None], dtype=torch.float64)  # (S,)
    n = len(rewards)
    return {
        "reward/mean": scored.mean().item() if len(scored) else float("nan"),
        "reward/std": scored.std().item() if len(scored) > 1 else float("nan"),
        "reward/accuracy": (scored > 0.5).double().mean().item() if len(scored) else float("nan"),
        "reward/unscored": float(n - len(scored)),
        "reward/unscored_frac": (n - len(scored)) / max(n, 1),
    }


def rollout_metrics(
    rollouts: list[Rollout], stage_seconds: dict[str, float], generated_at_step: int
) -> dict[str, float]:
    """Response lengths, and generated tokens per second of waiting for generation
    (`throughput/generate_wait_tokens_per_s`) and per second of the whole step (`throughput/tokens_per_s`)."""
    from rlstack.rollout.multiturn import episode_metrics

    lengths = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.float)
    generate_s, step_s = stage_seconds["generate"], sum(stage_seconds.values())
    return episode_metrics(rollouts) | {
        "response/length_mean": lengths.mean().item(),
        "response/length_max": lengths.max().item(),
        "response/truncated_frac": sum(r.truncated for r in rollouts) / len(rollouts),
        "throughput/generate_wait_tokens_per_s": lengths.sum().item() / max(generate_s, 1e-9),
        "throughput/tokens_per_s": lengths.sum().item() / max(step_s, 1e-9),
        "batch/generated_for_step": float(generated_at_step),
    }
