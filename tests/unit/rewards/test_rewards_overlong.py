"""The `overlong` reward (DAPO's soft over-long punishment): its values at the boundaries, its options checked
at config time, and a call through a reward group as training makes it."""

from __future__ import annotations

import doctest

import pytest

import rlstack.rewards.overlong as overlong_module
from rlstack.rewards import RewardError, RewardGroup, RewardSpec
from rlstack.rewards.overlong import overlong_penalty, overlong_reward
from rlstack.rewards.registry import reward_names, validate_specs


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (0, 0.0),
        (1, 0.0),
        (6, 0.0),  # L_max - L_cache: the last length without penalty
        (7, -0.25),  # first step of the ramp
        (8, -0.5),
        (9, -0.75),
        (10, -1.0),  # L_max
        (11, -1.0),  # beyond
        (10_000, -1.0),
    ],
)
def test_values_at_the_boundaries(length: int, expected: float) -> None:
    assert overlong_penalty(length, max_tokens=10, cache_tokens=4) == expected


def test_without_a_ramp_and_with_a_ramp_from_zero() -> None:
    assert [overlong_penalty(n, 10, 0) for n in (9, 10, 11)] == [0.0, 0.0, -1.0]  # a hard cut
    assert [overlong_penalty(n, 4, 4) for n in (0, 1, 2, 4, 5)] == [0.0, -0.25, -0.5, -1.0, -1.0]


def test_counts_token_ids_and_skips_samples_without_them() -> None:
    out = overlong_reward(
        ["p"] * 5,
        ["short", "ramp", "cut", "", [{"role": "assistant", "content": "hi"}]],
        [[5] * 3, [5] * 9, [5] * 12, [], []],
        max_tokens=10,
        cache_tokens=4,
    )
    # an empty response has 0 tokens; text without ids (a file scored by `rewards try`) has no known length
    assert out == [0.0, -0.75, -1.0, 0.0, None]


def test_registered_with_checked_options() -> None:
    assert "overlong" in reward_names()
    validate_specs([RewardSpec(name="overlong", options={"max_tokens": 20480, "cache_tokens": 4096})])
    cases = {
        "option 'max_tokens': Field required": {"cache_tokens": 4},
        "option 'cache_tokens': Input should be greater than or equal to 0": {
            "max_tokens": 8,
            "cache_tokens": -1,
        },
        "option 'max_tokens': Input should be greater than or equal to 1": {
            "max_tokens": 0,
            "cache_tokens": 0,
        },
        "cache_tokens (9) must not exceed max_tokens (8)": {"max_tokens": 8, "cache_tokens": 9},
        "unknown option 'max_len'": {"max_len": 8, "cache_tokens": 2},
    }
    for message, options in cases.items():
        with pytest.raises(RewardError, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate_specs([RewardSpec(name="overlong", options=options)])


def test_through_a_reward_group_next_to_a_task_reward() -> None:
    group = RewardGroup.in_process(
        [
            RewardSpec(name="puzzle"),
            RewardSpec(name="overlong", options={"max_tokens": 10, "cache_tokens": 4}),
        ]
    )
    out = group(
        ["p", "p"],
        ["\\boxed{(8-3)*4+4}", "\\boxed{8*3}"],
        completion_ids=[[5] * 8, [5] * 20],
        numbers=[[3, 4, 4, 8]] * 2,
        target=[24, 24],
    )
    assert out.per_reward["overlong"] == [-0.5, -1.0]
    assert out.total == [0.5, -1.0]


def test_doctests() -> None:
    assert doctest.testmod(overlong_module).failed == 0
