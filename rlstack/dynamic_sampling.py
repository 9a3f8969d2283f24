"""DAPO-style dynamic sampling: which groups of a step carry learning signal, and the selection of a step's
batch from them (`trainer.dynamic_sampling`; the driver generates the extra rounds).

A group (the samples of one prompt, one `prompt_id`) has signal when its scored samples got at least two
different rewards: with group-relative advantages every other group's advantages are exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rlstack.monitor.samples import DroppedRollout
from rlstack.types import Rollout

NO_SIGNAL = "no signal: every scored sample of its group got the same reward (dynamic sampling)"
SURPLUS = "surplus: the step already had prompts_per_step groups with signal (dynamic sampling)"


def groups_with_signal(rollouts: Sequence[Rollout]) -> list[str]:
    """The prompt ids whose scored samples got at least two different rewards, in order of appearance."""
    rewards: dict[str, set[float]] = {}
    for r in rollouts:
        seen = rewards.setdefault(r.prompt_id, set())
        if r.reward is not None:
            seen.add(r.reward)
    return [pid for pid, seen in rewards.items() if len(seen) > 1]


@dataclass
class Selection:
    """A step's batch under dynamic sampling: the rollouts that train (with their reward details) and the
    ones dropped, with the reason."""

    rollouts: list[Rollout] = field(default_factory=list)
    reward_info: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[DroppedRollout] = field(default_factory=list)
    groups: int = 0  # groups with signal that train


def select_groups(rollouts: Sequence[Rollout], reward_info: Sequence[dict[str, Any]], want: int) -> Selection:
    """The first `want` groups with signal train; groups without signal, and those beyond `want`, are
    dropped (named in `Selection.dropped`). With no group with signal at all every rollout trains (the
    update is then a no-op: the learner steps at lr 0), so a step never goes empty."""
    signal = groups_with_signal(rollouts)
    if not signal:
        return Selection(list(rollouts), list(reward_info))
    keep = set(signal[:want])
    out = Selection(groups=len(keep))
    for rollout, info in zip(rollouts, reward_info, strict=True):
        if rollout.prompt_id in keep:
            out.rollouts.append(rollout)
            out.reward_info.append(info)
        else:
            reason = SURPLUS if rollout.prompt_id in signal else NO_SIGNAL
            out.dropped.append(DroppedRollout(rollout, reason, info))
    return out
