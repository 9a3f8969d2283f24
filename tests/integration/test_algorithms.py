"""Every algorithm and every trajectory filter through the real trainer (Ray + vLLM + DeepSpeed, tiny
model), 2 steps each: the parameters move and the acceptance metrics are in range. One trainer serves the
critic-free algorithms (the algorithm config is swapped between phases); PPO needs the critic, so it gets
its own. The same runs check the rollout record's contracts: unscored samples and the staleness rule."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from rlstack.config import DynamicSamplingConfig, load_config
from rlstack.driver import Submitted, Trainer
from rlstack.mispo import AlgorithmConfig
from rlstack.rewards.config import RewardSpec
from rlstack.rewards.group import RewardGroup

pytestmark = [
    pytest.mark.ray,
    pytest.mark.vllm,
    pytest.mark.deepspeed,
    pytest.mark.usefixtures("trainer_ray"),  # one Ray session for both runs
]

STEPS = 2


def make_trainer(tmp_path: Path, name: str, **sections: dict) -> Trainer:
    config = {
        "trainer": {"run_dir": str(tmp_path / name), "prompts_per_step": 4,
                    "mode": "async", "max_staleness": 1},
        "rollout": {"sampling": {"n": 4, "max_tokens": 16}},
        "learner": {"micro_batch_size": 16, "zero_stage": 2, "lr": 1e-3},
        "eval": {"num_problems": 4, "samples": 1},
        "rewards": [{"import_path": "toy_rewards:digit_fraction_unless_odd"}],
    }  # fmt: skip
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return Trainer(load_config(path))


def moved(before: dict, after: dict) -> float:
    return max(float((after[k] - before[k]).abs().max()) for k in before)


def check_phase(steps: list[dict], algo: AlgorithmConfig) -> None:
    for m in steps:
        assert all(0.0 <= m[k] <= 1.0 for k in ("filter/token_accept", "filter/traj_accept")), m
        assert 0.0 <= m["actor/train_frac"] <= 1.0
        # async k = 1: the batch was sampled one update ago, so a few tokens fall outside the token band
        assert m["filter/token_accept"] > 0.5 and m["actor/nonfinite_logp_tokens"] == 0
        assert m["staleness/max"] <= 1 and m["staleness/dropped"] == 0
    assert any(m["actor/grad_norm"] > 0 for m in steps)
    if algo.name in ("grpo", "ppo", "gspo"):
        assert all(0.0 <= m["actor/clip_frac"] <= 1.0 for m in steps)
    if algo.name == "gspo":
        assert all(abs(m["actor/seq_ratio_mean"] - 1.0) < 0.1 for m in steps)
    if algo.traj_filter == "adaptive":
        lo, hi = steps[-1]["filter/traj_band_lo"], steps[-1]["filter/traj_band_hi"]
        assert math.exp(-math.log(1.01)) - 1e-9 <= lo < 1.0 < hi <= 1.01 + 1e-9


PHASES = [
    AlgorithmConfig(name="mispo", traj_filter="fixed"),
    AlgorithmConfig(name="mispo", traj_filter="adaptive"),
    AlgorithmConfig(name="mispo", traj_filter="stochastic"),
    AlgorithmConfig(name="mispo", traj_filter="off"),
    AlgorithmConfig(name="grpo", traj_filter="off"),
    AlgorithmConfig(name="gspo", traj_filter="off"),
]


def test_every_algorithm_and_filter_trains_through_the_trainer(tmp_path: Path) -> None:
    with make_trainer(tmp_path, "group") as trainer:
        all_steps = []
        for algo in PHASES:
            trainer.use_algorithm(algo)
            before = trainer.learner.export_weights()
            steps = [trainer.step() for _ in range(STEPS)]
            assert moved(before, trainer.learner.export_weights()) > 1e-5, algo
            check_phase(steps, algo)
            all_steps += steps
        # Unscored samples (the plugin raises on odd-length completions) leave the loss: counted, kept
        # apart from the accuracy, with their reason in samples/; never trained as 0.
        assert sum(m["reward/unscored"] for m in all_steps) > 0
        assert all(m["batch/tokens"] <= 16 * 16 for m in all_steps)
        records = [json.loads(line) for line in (tmp_path / "group/samples/rollouts.jsonl").open()]
        unscored = [r for r in records if r["reward"] is None]
        assert unscored and all("cannot score odd-length" in r["unscored_reason"] for r in unscored)
        assert all(len(r["response"]) % 2 == 1 for r in unscored)
        # The held-out evaluation reports unscored responses apart from the accuracy.
        ev = trainer.evaluate()
        for mode in ("greedy", "sampled"):
            unscored = ev[f"{mode}_unscored"]
            assert 0 <= unscored <= 4 and (unscored == 4 or 0.0 <= ev[f"{mode}_accuracy"] <= 1.0)
        # Dynamic sampling: a reward with signal in about half the groups; every step trains only groups
        # whose rewards differ, generating extra rounds (fresh weights, staleness 0) to fill the batch.
        group_rewards = trainer.rewards
        trainer.rewards = RewardGroup(
            [RewardSpec(import_path="toy_rewards:length_where_prompt_odd")], trainer.cfg.reward_workers
        )
        trainer.cfg.trainer.dynamic_sampling = DynamicSamplingConfig(enabled=True, max_rounds=3)
        n_records = sum(1 for _ in (tmp_path / "group/samples/rollouts.jsonl").open())
        steps = [trainer.step() for _ in range(3)]
        assert any(m["dynamic/rounds"] > 0 for m in steps)  # P(no round in 3 steps) ~ 2^-12
        for m in steps:
            assert m["dynamic/signal_groups"] + m["dynamic/short_groups"] == 4
            assert m["dynamic/signal_groups"] >= m["dynamic/first_signal_groups"]
            assert m["dynamic/extra_rollouts"] == 16 * m["dynamic/rounds"]
            assert m["staleness/max"] <= 1
        records = [json.loads(line) for line in (tmp_path / "group/samples/rollouts.jsonl").open()][
            n_records:
        ]
        assert len(records) == sum(16 * (m["dynamic/rounds"] + 1) for m in steps)  # every rollout recorded
        rewards: dict[tuple[str, bool], set[float]] = {}
        for r in records:
            if r["reward"] is not None:
                key = (r["prompt_id"], r.get("dropped", "").startswith("no signal"))
                rewards.setdefault(key, set()).add(r["reward"])
        assert any(dropped for _, dropped in rewards) and any(not dropped for _, dropped in rewards)
        for (_, dropped), seen in rewards.items():  # trained groups have signal, dropped ones none
            assert (len(seen) == 1) == dropped
        trainer.rewards = group_rewards
        trainer.cfg.trainer.dynamic_sampling = DynamicSamplingConfig()
        # The staleness rule at training time: a queued batch whose tokens are too old is dropped.
        current = trainer.learner.version
        fresh = trainer._finished(trainer.queue[0])
        stale = [replace(r, response_versions=[current - 2] * len(r.response_ids)) for r in fresh[:6]]
        trainer.queue.appendleft(Submitted(rows=[], step=trainer.step_index, rollouts=stale + fresh[6:]))
        m = trainer.step()
        assert m["staleness/dropped"] == 6 and m["batch/rows"] == len(fresh) - 6
        last = [json.loads(line) for line in (tmp_path / "group/samples/rollouts.jsonl").open()][
            -len(fresh) :
        ]
        assert sum("dropped" in r for r in last) == 6 and all(
            r["staleness"] == 2 for r in last if "dropped" in r
        )


def test_ppo_with_a_critic_trains_through_the_trainer(tmp_path: Path) -> None:
    algo = {"name": "ppo", "advantage": "critic", "traj_filter": "off"}
    critic = {"critic": {"enabled": True, "lr": 1e-3}}
    with make_trainer(tmp_path, "ppo", algorithm=algo, learner=critic) as trainer:
        before = trainer.learner.export_weights()
        steps = [trainer.step() for _ in range(STEPS)]
        assert moved(before, trainer.learner.export_weights()) > 1e-5
        check_phase(steps, trainer.cfg.algorithm)
        assert all(m["critic/grad_norm"] > 0 and math.isfinite(m["critic/mse"]) for m in steps)
