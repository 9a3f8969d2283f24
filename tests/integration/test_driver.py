"""The training driver end to end on real Ray + vLLM + DeepSpeed: sync vs async, resume after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlstack.config import load_config
from rlstack.driver import Trainer
from rlstack.metrics import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.deepspeed]

COMPARED = ("reward/mean", "actor/loss", "actor/grad_norm", "filter/token_accept", "response/length_mean")


def tiny_run(run_dir: Path, **sections: dict) -> dict:
    config = {
        "trainer": {"run_dir": str(run_dir), "steps": 5, "prompts_per_step": 4},
        "rollout": {"sampling": {"n": 4, "max_tokens": 24}},
        "learner": {"micro_batch_size": 16, "zero_stage": 2, "lr": 1e-3},
        "algorithm": {"traj_filter": "off"},
        "eval": {"num_problems": 8, "samples": 1},
        "rewards": [{"import_path": "toy_rewards:digit_fraction"}],
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def run_steps(config: dict, tmp_path: Path) -> list[dict]:
    path = tmp_path / f"{Path(config['trainer']['run_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    with Trainer(cfg) as trainer:
        return [trainer.step() for _ in range(cfg.trainer.steps)]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        for key in COMPARED:
            assert x[key] == pytest.approx(y[key], abs=1e-6), f"step {step}: {key} {x[key]} != {y[key]}"


@pytest.fixture(scope="module")
def sync_run(trainer_ray: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The baseline 5-step sync run (pi_old from the training forward, the default): its run directory and
    per-step metrics, shared by the tests that compare another mode against it."""
    tmp_path = tmp_path_factory.mktemp("sync_run")
    return tmp_path / "sync", run_steps(tiny_run(tmp_path / "sync", trainer={"mode": "sync"}), tmp_path)


@pytest.mark.usefixtures("trainer_ray")
def test_async_with_zero_staleness_equals_sync(sync_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    _, sync = sync_run
    async0 = run_steps(tiny_run(tmp_path / "async", trainer={"mode": "async", "max_staleness": 0}), tmp_path)
    assert any(m["actor/grad_norm"] > 0 for m in sync), "nothing was learned: the comparison would be vacuous"
    assert_same(sync, async0)
    assert all(m["staleness/max"] == 0 for m in async0)


@pytest.mark.usefixtures("trainer_ray")
def test_old_logp_from_the_training_forward_equals_the_separate_pass(
    sync_run: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    """learner.fuse_old_logp (the default) skips the pi_old forward; the run is the same as with it."""
    fused_dir, fused = sync_run
    separate = run_steps(
        tiny_run(tmp_path / "separate", trainer={"mode": "sync"}, learner={"fuse_old_logp": False}), tmp_path
    )
    assert all("time/old_logprobs" not in m for m in fused)
    assert all(m["time/old_logprobs"] > 0 for m in separate)
    assert any(m["actor/grad_norm"] > 0 for m in fused), "nothing was learned: a vacuous comparison"
    for step, (x, y) in enumerate(zip(fused, separate, strict=True), start=1):
        for key in (*COMPARED, "filter/log_ratio_p50", "filter/log_ratio_p95", "filter/combined_accept"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), f"step {step}: {key} {x[key]} != {y[key]}"
    records = (fused_dir / "samples" / "rollouts.jsonl").read_text().splitlines()
    assert len(records) == 5 * 16 and all("traj_accepted" in json.loads(r) for r in records)


@pytest.mark.usefixtures("trainer_ray")
def test_every_moe_run_logs_expert_health(sync_run: tuple[Path, list[dict]]) -> None:
    """Per step and MoE layer: load violation, dead experts, router entropy, routing confidence; the
    per-expert loads in expert_load.jsonl; the routing probe at step 1 (learner.moe.probe_every 10): an
    fp32 engine routes exactly like the fp32 learner."""
    run_dir, steps = sync_run
    for m in steps:
        for layer in (1, 2, 3):
            assert m[f"moe/layer{layer}/max_violation"] >= 0.0
            assert 0 <= m[f"moe/layer{layer}/dead_experts"] <= 8
            assert 0.0 < m[f"moe/layer{layer}/router_entropy"] <= math.log(8) + 1e-6
            assert 0.0 < m[f"moe/layer{layer}/routing_confidence"] < 1.0
    logged = [r for r in read_metrics(run_dir) if "actor/loss" in r]
    assert len(logged) == 5 and all("moe/layer1/router_entropy" in r for r in logged)
    assert not any(k.startswith("moe/load/") for r in logged for k in r), "loads belong in expert_load.jsonl"
    assert steps[0]["moe/routing_mismatch"] == 0.0 and steps[0]["moe/logp_gap_free"] < 1e-4
    assert all("moe/routing_mismatch" not in m for m in steps[1:])
    loads = [json.loads(line) for line in (run_dir / "expert_load.jsonl").read_text().splitlines()]
    assert [r["step"] for r in loads] == [1, 2, 3, 4, 5]
    assert sorted(loads[0]["load"]) == ["1", "2", "3"] and all(len(v) == 8 for v in loads[0]["load"].values())
    tokens = steps[0]["batch/tokens"]  # trained tokens; every real token is routed to top-2 experts
    assert all(sum(v) > 2 * tokens for v in loads[0]["load"].values())


@pytest.mark.usefixtures("trainer_ray")
@pytest.mark.parametrize("mode", ["rollout", "old"])
def test_routing_replay_with_a_bf16_engine(mode: str, tmp_path: Path) -> None:
    """R3 in the loop: the bf16 engine routes some tokens differently from the fp32 learner; replaying its
    routing narrows the learner/engine log-prob gap (the probe measures both ways every step here). R2,
    with two mini-batches: the second one's forward replays pi_old's routing after the first update moved
    the router, so some of its decisions are overridden."""
    learner = {"routing_replay": mode, "moe": {"probe_every": 1}}
    if mode == "old":
        learner |= {"fuse_old_logp": False, "n_minibatches": 2}
    config = tiny_run(tmp_path / mode, trainer={"steps": 2}, rollout={"dtype": "bfloat16"}, learner=learner)
    steps = run_steps(config, tmp_path)
    for m in steps:
        assert m["moe/routing_mismatch"] > 0.0
        assert m["actor/grad_norm"] > 0
        assert 0.0 < m["moe/replay_overrides"] < 0.5
        if mode == "rollout":  # (with R2 the second mini-batch's probe runs on updated weights)
            assert m["moe/logp_gap_replay"] < m["moe/logp_gap_free"]


@pytest.mark.usefixtures("trainer_ray")
def test_async_staleness_stays_within_bound(tmp_path: Path) -> None:
    config = tiny_run(tmp_path / "async2", trainer={"mode": "async", "max_staleness": 2, "steps": 4})
    steps = run_steps(config, tmp_path)
    staleness = [m["staleness/max"] for m in steps]
    assert max(staleness) <= 2 and max(staleness) > 0, staleness  # off-policy data was really used


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    """Async mode, k = 1: at the step-3 checkpoint one batch (sampled by version 2) is queued. The checkpoint
    saves it finished, with its token versions, so the resumed run trains step 4 on exactly those rollouts,
    one update stale, as the uninterrupted run did (regenerating them would make them fresh: staleness 0).
    The MoE routers' selection bias moves every step (aux-loss-free balancing): it must survive too."""
    trainer = {"steps": 6, "checkpoint_every": 3, "eval_every": 3, "mode": "async", "max_staleness": 1}
    config = tiny_run(tmp_path / "whole", trainer=trainer, learner={"moe": {"bias_update_rate": 0.02}})
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = os.environ | {"VLLM_LOGGING_LEVEL": "ERROR", "PYTHONPATH": str(Path(__file__).parent)}
    cli = [sys.executable, "-m", "rlstack.cli"]
    # The uninterrupted run and the one to kill run at once (each its own Ray): they overlap their waits.
    with (tmp_path / "whole.log").open("w") as whole_log:
        whole_run = subprocess.Popen(
            [*cli, "train", str(config_path), "--no-progress"],
            env=env,
            start_new_session=True,
            stdout=whole_log,
            stderr=whole_log,
        )
    killed_dir = tmp_path / "killed"
    try:
        proc = subprocess.Popen(
            [*cli, "train", str(config_path), f"trainer.run_dir={killed_dir}", "--no-progress"],
            env=env,
            start_new_session=True,  # its own process group: the kill takes Ray's processes with it
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 300
        while not (killed_dir / "checkpoints" / "latest").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before step 3 was saved"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert whole_run.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    finally:
        if whole_run.poll() is None:  # an assertion failed above: the run must not outlive the test
            os.killpg(whole_run.pid, signal.SIGKILL)
            whole_run.wait()
    assert (killed_dir / "checkpoints" / "latest").read_text() == "step_3"
    whole = {r["step"]: r for r in read_metrics(tmp_path / "whole") if "actor/loss" in r}
    # the step-6 evaluation is also the final one: made (and logged) once
    evals = [r["step"] for r in read_metrics(tmp_path / "whole") if "eval/greedy_accuracy" in r]
    assert evals == [0, 3, 6]

    resumed = subprocess.run(
        [*cli, "train", str(config_path), "--resume", str(killed_dir), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = {r["step"]: r for r in read_metrics(killed_dir) if "actor/loss" in r}
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    assert_same([whole[s] for s in (4, 5, 6)], [again[s] for s in (4, 5, 6)])
    loads = [json.loads(line)["step"] for line in (killed_dir / "expert_load.jsonl").read_text().splitlines()]
    assert loads == [1, 2, 3, 4, 5, 6]  # the redone steps replaced, not appended twice
    for s in (4, 5, 6):  # the queued batch kept its staleness across the kill
        assert again[s]["staleness/mean"] == whole[s]["staleness/mean"] == 1.0
        assert again[s]["filter/log_ratio_p50"] == pytest.approx(whole[s]["filter/log_ratio_p50"], abs=1e-6)


@pytest.mark.usefixtures("trainer_ray")
def test_misbehaving_reward_plugins_cost_only_their_samples(tmp_path: Path) -> None:
    """A plugin that raises, one that sleeps past the time limit and one that returns the wrong length:
    each is logged per sample (samples/ keeps the error under the plugin's name), and training goes on."""
    bad = ["raises_on_odd_length", "sleeps_past_the_limit", "wrong_length"]
    config = tiny_run(
        tmp_path / "bad_rewards",
        trainer={"steps": 2},
        reward_workers={"num_workers": 1, "time_limit_s": 2.0},
    )
    config["rewards"] = [{"import_path": "toy_rewards:digit_fraction"}] + [
        {"import_path": f"toy_rewards:{name}"} for name in bad
    ]
    steps = run_steps(config, tmp_path)
    assert len(steps) == 2
    samples = 4 * 4  # prompts_per_step * n
    for m in steps:
        assert m["actor/grad_norm"] > 0 and m["reward/toy_rewards:digit_fraction"] > 0
        assert m["reward/toy_rewards:wrong_length_errors"] == samples
        assert m["reward/toy_rewards:raises_on_odd_length_errors"] > 0
        assert m["reward/toy_rewards:sleeps_past_the_limit_timeouts"] > 0
        assert m["time/score"] < 3 * 2.0 + 5  # two deadlines per chunk, not one per sample
    records = [json.loads(line) for line in (tmp_path / "bad_rewards" / "samples" / "rollouts.jsonl").open()]
    assert len(records) == 2 * samples
    errors = [r["reward_info"]["toy_rewards:wrong_length"]["error"] for r in records]
    assert all("returned 2 values for 1 completions" in e for e in errors)
    timeouts = [r for r in records if "toy_rewards:sleeps_past_the_limit" in r.get("reward_info", {})]
    assert timeouts and all(
        "timeout" in r["reward_info"]["toy_rewards:sleeps_past_the_limit"]["error"] for r in timeouts
    )


@pytest.mark.usefixtures("trainer_ray")
def test_actor_critic_run_trains_the_critic_beside_the_policy(tmp_path: Path) -> None:
    config = tiny_run(
        tmp_path / "critic",
        trainer={"steps": 3},
        algorithm={"advantage": "critic"},
        learner={"critic": {"enabled": True, "lr": 1e-3}},
    )
    steps = run_steps(config, tmp_path)
    assert all(m["actor/grad_norm"] > 0 and m["critic/grad_norm"] > 0 for m in steps)
    assert all(m["time/values"] > 0 for m in steps)
    assert all(math.isfinite(m["critic/mse"]) and m["critic/lr"] == 1e-3 for m in steps)
    # The critic's values move between steps (it is trained), and they feed the advantages.
    assert len({round(m["critic/value_mean"], 6) for m in steps}) == 3
