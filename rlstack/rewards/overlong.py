"""The `overlong` reward: DAPO's soft over-long punishment (Yu et al. 2025, "DAPO", section 3.4).

A response of L tokens gets 0 while L <= max_tokens - cache_tokens, then falls linearly to -1 at
L = max_tokens, and -1 beyond: (max_tokens - cache_tokens - L) / cache_tokens in between. Add it next to
the task reward, weight 1 as in DAPO:

    rewards:
      - {name: math}
      - {name: overlong, options: {max_tokens: 20480, cache_tokens: 4096}}

L is the number of response token ids (`completion_ids`, which every reward call receives): the tokens the
policy generated, plus, in a multi-turn episode, the tool-output tokens inserted between its turns (the
whole response the learner trains on; a reward sees no mask that would tell them apart). Set max_tokens to
the rollout's generation limit (`rollout.sampling.max_tokens`) so that a truncated response gets -1.

    >>> overlong_reward(["p"] * 4, ["a"] * 4, [[7] * n for n in (6, 7, 8, 11)], max_tokens=10, cache_tokens=4)
    [0.0, -0.25, -0.5, -1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rlstack.rewards.registry import register


class OverlongOptions(BaseModel):
    """Options of the `overlong` reward."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(ge=1)
    """L_max: a response this long gets -1, a longer one too."""

    cache_tokens: int = Field(ge=0)
    """L_cache: the length of the linear ramp from 0 (at max_tokens - cache_tokens) to -1 (at max_tokens);
    0 = no ramp: 0 up to max_tokens, -1 beyond."""

    @model_validator(mode="after")
    def _check(self) -> OverlongOptions:
        if self.cache_tokens > self.max_tokens:
            raise ValueError(
                f"cache_tokens ({self.cache_tokens}) must not exceed max_tokens ({self.max_tokens}): "
                "the ramp starts at max_tokens - cache_tokens"
            )
        return self


def overlong_penalty(length: int, max_tokens: int, cache_tokens: int) -> float:
    """DAPO's soft over-long punishment of a response of `length` tokens: 0, a linear ramp, or -1.

    >>> [overlong_penalty(n, 10, 4) for n in (0, 6, 7, 9, 10, 11)]
    [0.0, 0.0, -0.25, -0.75, -1.0, -1.0]
    """
    start = max_tokens - cache_tokens
    if length <= start:
        return 0.0
    if length <= max_tokens:
        return (start - length) / cache_tokens
    return -1.0


def _has_text(completion: Any) -> bool:
    """Whether a completion (a string or a multi-turn episode's message list) holds any text."""
    if isinstance(completion, str):
        return bool(completion)
    if isinstance(completion, list | tuple):
        return any(isinstance(m, dict) and m.get("content") for m in completion)
    return False


@register("overlong", options=OverlongOptions)
def overlong_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    *,
    max_tokens: int,
    cache_tokens: int,
    **columns: Any,
) -> list[float | None]:
    """`overlong_penalty` of each response's token count; None for a sample whose token ids are missing (no
    ids but some text: `rlstack rewards try` on a file without `completion_ids`), whose length is unknown."""
    ids = completion_ids if completion_ids is not None else [[] for _ in completions]
    out: list[float | None] = []
    for completion, tokens in zip(completions, ids, strict=True):
        if not tokens and _has_text(completion):
            out.append(None)
        else:
            out.append(overlong_penalty(len(tokens), max_tokens, cache_tokens))
    return out
