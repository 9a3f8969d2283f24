"""The `env` reward: the episode's environment scores it (`get_reward()`, TRL's environment-owned reward).

>>> class Env:
...     def get_reward(self):
...         return 1.0
>>> env_reward(["p"], ["c"], [[1]], environments=[Env()])
[1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlstack.rewards.registry import register


@register("env")
def env_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]],
    environments: Sequence[Any] | None = None,
    **columns: Any,
) -> list[float | None]:
    """`get_reward()` of each sample's environment; None for samples without one (single-turn rows, or an
    environment with no `get_reward`). An environment that could not travel here (not picklable) is an
    error, not a missing score."""
    if environments is None:
        return [None] * len(completions)
    scores: list[float | None] = []
    for env in environments:
        if env is None:
            raise ValueError(
                "the env reward needs the episode's environment, which did not reach the reward worker "
                "(a single-turn sample, or an environment that cannot be pickled)"
            )
        get_reward = getattr(env, "get_reward", None)
        scores.append(None if get_reward is None else float(get_reward()))
    return scores
