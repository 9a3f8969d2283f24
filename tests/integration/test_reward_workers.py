"""RewardGroup on real Ray actors: sample routing and the cache, and a worker that crashes or hangs is
replaced while the batch still comes back."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rlstack.rewards.config import RewardSpec, RewardWorkersConfig
from rlstack.rewards.group import RewardGroup

pytestmark = [pytest.mark.ray]

TOY = Path(__file__).parent


@pytest.fixture(scope="module")
def ray_local():
    import ray

    sys.path.insert(0, str(TOY))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(TOY)}},
    )
    yield
    ray.shutdown()
    sys.path.remove(str(TOY))


def test_samples_are_routed_to_the_same_worker_so_the_cache_hits(ray_local) -> None:
    group = RewardGroup(
        [RewardSpec(import_path="toy_rewards:digit_fraction")],
        RewardWorkersConfig(num_workers=2, chunk_size=3),
    )
    try:
        completions = [f"a{i}b" for i in range(10)]
        prompts = [f"p{i % 5}" for i in range(10)]
        first = group(prompts, completions)
        assert first.total == [pytest.approx(1 / 3)] * 10 and first.cache_hits == 0
        second = group([*reversed(prompts), "p0", "p1"], [*reversed(completions), "xx", "7"])
        assert second.cache_hits == 10
        assert second.total == [pytest.approx(1 / 3)] * 10 + [0.0, 1.0]
    finally:
        group.shutdown()


def test_a_crashed_worker_costs_its_samples_and_is_replaced(ray_local) -> None:
    specs = [RewardSpec(import_path="toy_rewards:exits_the_process")]
    group = RewardGroup(specs, RewardWorkersConfig(num_workers=1, chunk_size=2))
    try:
        out = group(["p"] * 4, ["ok", "crash", "fine", "good"])
        label = specs[0].label
        # The chunk holding 'crash' was lost with the process; the worker was replaced.
        assert out.workers_restarted == 1
        assert out.errors[label] >= 2 and out.per_reward[label].count(None) == out.errors[label]
        assert all(info["error"].startswith("reward worker lost") for info in out.info[label] if info)
        assert group(["p"], ["fine again"]).total == [1.0]
    finally:
        group.shutdown()


def test_a_worker_with_hung_plugin_calls_is_replaced(ray_local) -> None:
    specs = [
        RewardSpec(import_path="toy_rewards:sleeps_past_the_limit"),
        RewardSpec(import_path="toy_rewards:digit_fraction"),
    ]
    config = RewardWorkersConfig(num_workers=1, time_limit_s=0.5, max_abandoned_threads=0)
    group = RewardGroup(specs, config)
    try:
        out = group(["p"] * 3, ["abc", "a1", "zz"])
        sleeper, digits = (s.label for s in specs)
        assert out.per_reward[sleeper] == [0.0, None, 0.0]
        assert out.timeouts[sleeper] == 1
        assert out.per_reward[digits] == [0.0, 0.5, 0.0]
        assert out.total == [0.0, 0.5, 0.0]
        assert group.restarts == 1  # two abandoned threads > max_abandoned_threads = 0
        assert group(["p"], ["ok"]).total == [0.0]
    finally:
        group.shutdown()
