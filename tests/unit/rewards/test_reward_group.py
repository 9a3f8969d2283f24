"""RewardScorer / RewardGroup in-process (num_workers 0): deadlines, per-sample isolation, cache, merging."""

from __future__ import annotations

import threading
import time

import pytest

from rlstack.rewards.config import RewardSpec, RewardWorkersConfig
from rlstack.rewards.group import RewardGroup, RewardScorer, plugin_version

CALLS: list[int] = []
RELEASE = threading.Event()  # lets abandoned sleeper threads finish at the end of a test


def counting(prompts, completions, **columns):
    CALLS.append(len(completions))
    return [float(len(c)) for c in completions]


def counting_with_scale(prompts, completions, scale=1.0, **columns):
    return [scale * len(c) for c in completions]


def hangs_on_slow(prompts, completions, **columns):
    if "slow" in completions:
        RELEASE.wait(30)
    return [1.0 for _ in completions]


def hangs_always(prompts, completions, **columns):
    RELEASE.wait(30)
    return [1.0 for _ in completions]


def raises_on_boom(prompts, completions, **columns):
    if "boom" in completions:
        raise RuntimeError("boom in the plugin")
    return [0.5 for _ in completions]


def wrong_length(prompts, completions, **columns):
    return [1.0] * (len(completions) + 1)


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    RELEASE.clear()
    yield
    RELEASE.set()


def spec(fn, **kw) -> RewardSpec:
    return RewardSpec(import_path=f"{__name__}:{fn.__name__}", **kw)


def test_cache_serves_repeated_samples_and_failures_are_not_cached() -> None:
    scorer = RewardScorer([spec(counting)], RewardWorkersConfig(num_workers=0))
    first = scorer.score(["p", "p"], ["ab", "abc"], {})
    again = scorer.score(["p", "p", "p"], ["ab", "abc", "abcd"], {})
    assert first.per_reward[spec(counting).label] == [2.0, 3.0]
    assert again.per_reward[spec(counting).label] == [2.0, 3.0, 4.0]
    assert again.cache_hits == 2 and CALLS == [2, 1]  # only the new sample was scored
    # A column that differs is a different sample.
    scorer.score(["p"], ["ab"], {"answer": ["1"]})
    assert CALLS == [2, 1, 1]

    boom = RewardScorer([spec(raises_on_boom)], RewardWorkersConfig(num_workers=0))
    out = boom.score(["p", "p"], ["boom", "ok"], {})
    assert out.per_reward[spec(raises_on_boom).label] == [None, 0.5]
    assert out.errors[spec(raises_on_boom).label] == 1
    assert boom.score(["p"], ["boom"], {}).cache_hits == 0


def test_cache_key_follows_options_and_source() -> None:
    a = RewardScorer([spec(counting_with_scale, options={"scale": 2.0})]).fns[0]
    b = RewardScorer([spec(counting_with_scale, options={"scale": 3.0})]).fns[0]
    assert plugin_version(a) != plugin_version(b)
    assert plugin_version(counting) != plugin_version(counting_with_scale)
    assert RewardScorer([spec(counting_with_scale, options={"scale": 2.0})]).score(
        ["p"], ["abc"], {}
    ).per_reward[spec(counting_with_scale).label] == [6.0]


def test_a_sample_that_hangs_costs_only_itself_within_two_deadlines() -> None:
    cfg = RewardWorkersConfig(num_workers=0, time_limit_s=0.5)
    scorer = RewardScorer([spec(hangs_on_slow)], cfg)
    start = time.monotonic()
    out = scorer.score(["p"] * 4, ["a", "slow", "b", "c"], {})
    elapsed = time.monotonic() - start
    label = spec(hangs_on_slow).label
    assert out.per_reward[label] == [1.0, None, 1.0, 1.0]
    assert out.timeouts[label] == 1 and out.errors[label] == 1
    assert "timeout" in out.info[label][1]["error"]
    assert elapsed < 2 * 0.5 + 0.5, elapsed
    assert out.abandoned_threads == 2  # the chunk call and the slow sample's call


def test_a_plugin_that_always_hangs_costs_two_deadlines_not_one_per_sample() -> None:
    cfg = RewardWorkersConfig(num_workers=0, time_limit_s=0.3)
    scorer = RewardScorer([spec(hangs_always)], cfg)
    start = time.monotonic()
    out = scorer.score(["p"] * 16, [str(i) for i in range(16)], {})
    assert time.monotonic() - start < 2 * 0.3 + 0.5
    assert out.per_reward[spec(hangs_always).label] == [None] * 16
    assert out.timeouts[spec(hangs_always).label] == 16


def test_wrong_length_output_fails_every_sample_with_the_reason() -> None:
    out = RewardScorer([spec(wrong_length)]).score(["p", "p"], ["a", "b"], {})
    label = spec(wrong_length).label
    assert out.per_reward[label] == [None, None] and out.errors[label] == 2
    assert "returned 2 values for 1 completions" in out.info[label][0]["error"]


def test_group_in_process_keeps_order_across_chunks_and_combines_weights() -> None:
    specs = [spec(counting, weight=2.0), spec(raises_on_boom)]
    group = RewardGroup(specs, RewardWorkersConfig(num_workers=0, chunk_size=2))
    completions = ["a", "bb", "boom", "dddd", "eeeee"]
    out = group(["p", "p", "q", "r", "r"], completions)
    assert out.per_reward[specs[0].label] == [1.0, 2.0, 4.0, 4.0, 5.0]
    assert out.per_reward[specs[1].label] == [0.5, 0.5, None, 0.5, 0.5]
    assert out.total == [2.5, 4.5, 8.0, 8.5, 10.5]
    assert out.errors == {specs[0].label: 0, specs[1].label: 1}
    assert sorted(CALLS) == [1, 2, 2]  # chunks of whole prompt groups, at most 2 samples unless one is larger
    CALLS.clear()
    group(["p"] * 3 + ["q"], ["w", "x", "y", "z"])
    assert sorted(CALLS) == [1, 3]  # a group larger than chunk_size stays whole


def test_group_refuses_unknown_plugins_and_mismatched_columns() -> None:
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RewardGroup([RewardSpec(name="nope")], RewardWorkersConfig(num_workers=0))
    group = RewardGroup([spec(counting)], RewardWorkersConfig(num_workers=0))
    with pytest.raises(ValueError, match="columns of other lengths"):
        group(["p", "p"], ["a", "b"], answer=["1"])


def test_math_verifier_timeouts_are_counted_and_not_cached() -> None:
    scorer = RewardScorer([RewardSpec(name="math")], RewardWorkersConfig(num_workers=0))
    completions = ["\\boxed{9^{9^{9}}}", "\\boxed{4}"]
    out = scorer.score(["p", "p"], completions, {"answer": ["5", "4"]})
    assert out.per_reward["math"] == [None, 1.0]
    assert out.timeouts["math"] == 1 and out.errors["math"] == 0
    assert "timeout" in out.info["math"][0]
    assert (
        scorer.score(["p", "p"], completions, {"answer": ["5", "4"]}).cache_hits == 1
    )  # only the verified one
