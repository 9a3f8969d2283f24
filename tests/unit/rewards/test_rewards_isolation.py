"""A failing reward plugin costs only the samples it fails on: they score None, the rest are scored."""

from __future__ import annotations

import logging

import pytest

from rlstack.rewards.config import RewardSpec
from rlstack.rewards.group import RewardGroup

PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["\\boxed{4}", "boom", "\\boxed{6}"]


def raises_on_boom(prompts, completions, **columns):
    if "boom" in completions:
        raise RuntimeError("cannot score 'boom'")
    return [1.0] * len(completions)


def wrong_length(prompts, completions, **columns):
    return [1.0]  # one score, whatever the batch size


def test_raising_plugin_isolates_to_the_failing_sample(caplog: pytest.LogCaptureFixture) -> None:
    group = RewardGroup.in_process([RewardSpec(import_path=f"{__name__}:raises_on_boom")])
    with caplog.at_level(logging.ERROR):
        result = group(PROMPTS, COMPLETIONS)
    label = f"{__name__}:raises_on_boom"
    assert result.per_reward[label] == [1.0, None, 1.0]
    assert result.total == [1.0, None, 1.0]
    assert result.errors == {label: 1}
    assert f"reward '{label}' failed on sample 1: RuntimeError: cannot score 'boom'" in caplog.text


def test_wrong_length_output_is_named_and_isolated(caplog: pytest.LogCaptureFixture) -> None:
    specs = [RewardSpec(import_path=f"{__name__}:wrong_length"), RewardSpec(name="math")]
    with caplog.at_level(logging.ERROR):
        result = RewardGroup.in_process(specs)(PROMPTS, COMPLETIONS, answer=["4", "5", "7"])
    # per sample, a one-element answer is the right length: the plugin recovers on every sample
    assert result.per_reward[f"{__name__}:wrong_length"] == [1.0, 1.0, 1.0]
    assert result.per_reward["math"] == [1.0, 0.0, 0.0]
    assert f"reward '{__name__}:wrong_length' failed on a chunk of 3" in caplog.text
