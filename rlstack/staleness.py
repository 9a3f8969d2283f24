"""The staleness rule: a trajectory may train only while its oldest token is at most k updates old.

Staleness is per trajectory and counted from its OLDEST policy-generated token (`Rollout.oldest_version`):
    staleness(tau) = current version - min over tau's generated tokens of the version that produced it
A multi-turn episode, a partial rollout continued under new weights, or a generation re-dispatched after
a worker failure can span versions; the rule holds for all of them because it reads the per-token
versions, not how the rollout was scheduled. The driver applies it to every batch right before training
(`enforce_staleness`): rollouts beyond the bound are dropped and counted, never trained on.
"""

from __future__ import annotations

from collections import Counter

from rlstack.types import Rollout


def enforce_staleness(
    rollouts: list[Rollout], current_version: int, max_staleness: int
) -> tuple[list[Rollout], list[Rollout], dict[str, float]]:
    """Split `rollouts` into (kept, dropped) by the bound `staleness <= max_staleness`, with metrics:
    `staleness/dropped`, `staleness/mean` and `staleness/max` over the kept ones, and the histogram of the
    kept ones, `staleness/hist_<s>` for s = 0..max_staleness (trajectory counts)."""
    if max_staleness < 0:
        raise ValueError(f"max_staleness = {max_staleness}: must be >= 0")
    staleness = [r.staleness(current_version) for r in rollouts]
    future = [r.prompt_id for r, s in zip(rollouts, staleness, strict=True) if s < 0]
    if future:
        raise ValueError(
            f"rollout(s) {', '.join(future[:3])} carry token versions newer than the learner's "
            f"{current_version}: the rollout record or the version counter is wrong"
        )
    kept = [r for r, s in zip(rollouts, staleness, strict=True) if s <= max_staleness]
    dropped = [r for r, s in zip(rollouts, staleness, strict=True) if s > max_staleness]
    kept_staleness = [s for s in staleness if s <= max_staleness]
    counts = Counter(kept_staleness)
    metrics = {
        "staleness/dropped": float(len(dropped)),
        "staleness/mean": sum(kept_staleness) / len(kept_staleness) if kept_staleness else 0.0,
        "staleness/max": float(max(kept_staleness, default=0)),
    }
    metrics |= {f"staleness/hist_{s}": float(counts.get(s, 0)) for s in range(max_staleness + 1)}
    return kept, dropped, metrics
