"""The `preference` reward: did a judge policy pick the better of two answers? (for training a GenRM)

The policy answers a preference question (task `preference` in rlstack.data.tasks) with a short rationale
and `[[A]]` or `[[B]]`; the reward is 1.0 when its single bracketed choice is the gold label (column
`label_column`, by default `answer`), else 0.0 (no choice, or a hedge naming both); None where a row has
no label.

    >>> preference_reward(["p"] * 3, ["7+5=12, so 132, [[A]]", "[[A]][[B]]", "B"], answer=["A", "A", "B"])
    [1.0, 0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlstack.config_base import StrictModel
from rlstack.rewards.extract import completion_text
from rlstack.rewards.judges.parsing import parse_preference
from rlstack.rewards.registry import register, split_options


class PreferenceOptions(StrictModel):
    """Options of the `preference` reward."""

    label_column: str = "answer"
    """The column holding the gold choice, A or B."""


@register("preference", options=PreferenceOptions)
def preference_reward(
    prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 where the completion's single bracketed choice is the gold label, else 0.0; None without one."""
    options, columns = split_options(PreferenceOptions, kwargs, "preference")
    label_column = options.label_column
    labels = columns.get(label_column)
    if labels is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for completion, label in zip(completions, labels, strict=True):
        if label is None:
            out.append(None)
            continue
        gold = str(label).strip().strip("[]").upper()
        if gold not in ("A", "B"):
            raise ValueError(f"preference: label {label!r} in column '{label_column}' is not A or B")
        out.append(float(parse_preference(completion_text(completion), strict=True) == gold))
    return out
