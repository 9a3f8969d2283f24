"""A run survives its actors failing: faults injected with SIGKILL / SIGSTOP on the real actors' processes
(Ray + vLLM + DeepSpeed on the tiny model), and SIGKILL / SIGTERM on a whole `rlstack train`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from rlstack.config import load_config
from rlstack.driver import Trainer
from rlstack.metrics import read_metrics
from rlstack.run_dir import RunDirLockedError

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.deepspeed]

PROMPTS, N = 4, 4  # samples per step: 16


def config(run_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "trainer": {"run_dir": str(run_dir), "steps": 4, "prompts_per_step": PROMPTS},
        "rollout": {"sampling": {"n": N, "max_tokens": 24}},
        "learner": {"micro_batch_size": 16, "zero_stage": 2, "lr": 1e-3},
        "algorithm": {"traj_filter": "off"},
        "eval": {"num_problems": 4, "samples": 1},
        "rewards": [{"import_path": "toy_rewards:digit_fraction"}],
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def write(cfg: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit_in_thread(trainer: Trainer) -> tuple[threading.Thread, dict[str, Any]]:
    """`trainer.fit()` in a thread (the test injects faults from the main one); its result or error."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = trainer.fit(progress=False)
        except BaseException as error:  # the test re-raises it
            out["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def finish(thread: threading.Thread, out: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    thread.join(timeout)
    assert not thread.is_alive(), "the run did not finish"
    if "error" in out:
        raise out["error"]
    return out["result"]


def step_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    records = [r for r in read_metrics(run_dir) if "actor/loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r for r in records}


def samples(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "samples" / "rollouts.jsonl").read_text().splitlines()]


def shm_bytes() -> int:
    return sum(e.stat().st_size for e in os.scandir("/dev/shm") if e.is_file(follow_symlinks=False))


@pytest.mark.usefixtures("trainer_ray")
def test_killed_and_hung_rollout_workers_are_replaced_and_the_run_trains_every_sample(tmp_path: Path) -> None:
    """Step 2: the rollout worker is SIGKILLed mid-generation. Step 3: its replacement is SIGSTOPped
    mid-generation (a hang): the generate deadline fires naming it. Each time the worker is replaced, its
    share generated again, and the step trains on all 16 samples."""
    run_dir = tmp_path / "run"
    # long responses (about 3.5 s of generation a step) so that the faults land inside a generate call
    cfg = config(
        run_dir,
        rollout={"sampling": {"n": N, "max_tokens": 384, "min_tokens": 384}, "max_model_len": 512},
        faults={"generate_timeout_s": 20.0},
    )
    shm_before = shm_bytes()
    with Trainer(load_config(write(cfg, tmp_path / "run.yaml"))) as trainer:
        group = trainer.rollout
        thread, out = fit_in_thread(trainer)
        killed: list[int] = []
        scratch_dirs: list[str] = []
        for step, sig in ((2, signal.SIGKILL), (3, signal.SIGSTOP)):
            # the step's generation is in flight once the driver reached it and the worker got the call
            wait_for(
                lambda s=step: trainer.step_index == s - 1 and group._busy[0] > 0, f"step {step} generating"
            )
            time.sleep(1.0)
            pid = group.info[0]["pid"]
            scratch_dirs.append(group.info[0]["scratch"])
            os.kill(pid, sig)
            killed.append(pid)
            wait_for(lambda p=pid: group.info[0]["pid"] != p, "the replacement", timeout=120)
        result = finish(thread, out)
        failures = list(group.failures)
    assert result["stopped"] is None
    assert len(failures) == 2, failures
    assert "rollout worker 0" in failures[0] and "died during `generate` at step 2" in failures[0]
    assert "did not answer `generate` at step 3" in failures[1] and "20 s deadline" in failures[1]
    records = step_records(run_dir)
    assert sorted(records) == [1, 2, 3, 4]
    for step, record in records.items():
        assert record["batch/rows"] == PROMPTS * N, f"step {step} trained on {record['batch/rows']} samples"
    assert records[1]["faults/rollout_restarts"] == 0 and records[4]["faults/rollout_restarts"] == 2
    assert records[4]["faults/lost_seconds"] > 0
    trained = samples(run_dir)
    assert [sum(1 for r in trained if r["step"] == s) for s in (1, 2, 3, 4)] == [PROMPTS * N] * 4
    # nothing left behind: the killed and stopped processes are gone, no engine process, no /dev/shm, no
    # engine scratch dir in /tmp
    assert all(scratch_dirs) and not any(map(os.path.exists, scratch_dirs)), scratch_dirs
    _, alive = psutil.wait_procs([psutil.Process(p) for p in killed if psutil.pid_exists(p)], timeout=30)
    assert alive == [], f"killed workers still running: {alive}"
    assert shm_bytes() <= shm_before + (1 << 20), "/dev/shm grew"


@pytest.mark.usefixtures("trainer_ray")
def test_an_async_engine_worker_killed_mid_generation_leaves_no_engine_process(tiny_checkpoint: Path) -> None:
    """vLLM's AsyncLLM runs its engine core in a process of its own, which Ray does not kill with the actor:
    the group kills it when it replaces the worker. The call still returns every rollout."""
    from rlstack.rollout.config import RolloutConfig, SamplingConfig
    from rlstack.rollout.group import RolloutGroup
    from rlstack.rollout.worker import Prompt

    shm_before = shm_bytes()
    sampling = SamplingConfig(n=4, max_tokens=256, min_tokens=256)
    config = RolloutConfig(engine="async", sampling=sampling, max_model_len=512)
    with RolloutGroup(tiny_checkpoint, config) as group:
        engine_processes = group.info[0]["children"]
        scratch = group.info[0]["scratch"]
        assert engine_processes, "AsyncLLM should run its engine core in a child process"
        pending = group.submit([Prompt(f"p{i}", text="<|user|>1+1<|assistant|>") for i in range(4)], step=7)
        time.sleep(1.0)
        assert not pending.ready()
        os.kill(group.info[0]["pid"], signal.SIGKILL)
        rollouts = group.collect(pending)
        assert len(rollouts) == 16 and group.restarts == 1
        assert "died during `generate` at step 7" in group.failures[0]
    left = [p for p in engine_processes if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert left == [], f"engine processes of the killed worker still running: {left}"
    assert scratch and not os.path.exists(scratch), scratch
    assert shm_bytes() <= shm_before + (1 << 20), "/dev/shm grew"


@pytest.mark.usefixtures("trainer_ray")
def test_a_learner_killed_between_steps_restarts_from_the_last_checkpoint(tmp_path: Path) -> None:
    """The learner's process is SIGKILLed after step 3 (checkpoint at step 2): the run restarts it from
    step_2, rolls the engines back, redoes step 3 exactly (same loss) and finishes; every step is logged
    once, and the data cursor and the trained prompts show nothing repeated or skipped."""
    run_dir = tmp_path / "run"
    # a previous run's outputs in the directory, with a broken initial policy: moved aside, never reused
    stale_init = run_dir / "checkpoints" / "init"
    stale_init.mkdir(parents=True)
    (stale_init / "config.json").write_text("{not json")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "actor/loss": 99.0}\n')
    cfg = config(run_dir, trainer={"steps": 5, "checkpoint_every": 2, "keep_last": 1})
    with Trainer(load_config(write(cfg, tmp_path / "run.yaml"))) as trainer:
        thread, out = fit_in_thread(trainer)
        with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()}"):  # one run per directory
            Trainer(load_config(write(cfg, tmp_path / "second.yaml")))
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and 3 in step_records(run_dir), "step 3")
        first_step_3 = step_records(run_dir)[3]
        old_pid = trainer.learner.info[0]["pid"]
        os.kill(old_pid, signal.SIGKILL)
        result = finish(thread, out)
    records = step_records(run_dir)
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert records[5]["faults/learner_restarts"] == 1 and records[5]["faults/steps_redone"] == 1
    for key in ("actor/loss", "reward/mean", "actor/grad_norm"):  # step 3 redone exactly
        assert records[3][key] == pytest.approx(first_step_3[key], abs=1e-6), key
    for step, record in records.items():  # the data cursor: P prompts drawn per step, none twice
        assert record["data/prompts_drawn"] == step * PROMPTS
    trained = samples(run_dir)
    assert [sum(1 for r in trained if r["step"] == s) for s in range(1, 6)] == [PROMPTS * N] * 5
    prompt_ids = {(r["step"], r["prompt_id"]) for r in trained}
    assert len({p for _, p in prompt_ids}) == len(prompt_ids) == 5 * PROMPTS
    placement = json.loads((run_dir / "placement.json").read_text())
    assert placement["learner"][0]["pid"] != old_pid  # rewritten for the new learner
    assert Path(result["checkpoint"]).name == "step_5"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["init", "latest", "step_5"]
    (previous,) = (run_dir / "previous").iterdir()
    assert (previous / "checkpoints" / "init" / "config.json").read_text() == "{not json"
    assert (previous / "metrics.jsonl").read_text() == '{"step": 1, "actor/loss": 99.0}\n'
    assert not (run_dir / ".rlstack.lock").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("trainer_ray")
def test_a_learner_failure_beyond_max_learner_restarts_stops_naming_the_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = config(run_dir, trainer={"steps": 4, "checkpoint_every": 1}, faults={"max_learner_restarts": 0})
    with Trainer(load_config(write(cfg, tmp_path / "run.yaml"))) as trainer:
        thread, out = fit_in_thread(trainer)
        wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), "the step-1 checkpoint")
        os.kill(trainer.learner.info[0]["pid"], signal.SIGKILL)
        with pytest.raises(
            RuntimeError, match=r"learner rank 0 .* died during .*max_learner_restarts = 0.*--resume"
        ):
            finish(thread, out)


# ---- whole runs: SIGKILL inside a save, SIGTERM ------------------------------------------------------


def cli_env() -> dict[str, str]:
    return os.environ | {"VLLM_LOGGING_LEVEL": "ERROR", "PYTHONPATH": str(Path(__file__).parent)}


CLI = [sys.executable, "-m", "rlstack.cli"]


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def resume_to_the_end(config_path: Path, run_dir: Path, steps: int) -> None:
    """`rlstack train --resume` finishes the run; every step is then logged exactly once."""
    resumed = subprocess.run(
        [*CLI, "train", str(config_path), "--resume", str(run_dir), "--no-progress"],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(step_records(run_dir)) == list(range(1, steps + 1))


@pytest.mark.slow
def engine_scratch_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("rlstack-vllm-*"))


def test_sigkill_inside_a_checkpoint_save_resumes_from_the_previous_checkpoint(tmp_path: Path) -> None:
    """... and the killed run's vLLM scratch dir (which its close_llm never removed) is swept by the next
    engine start."""
    scratch_before = engine_scratch_dirs()
    run_dir = tmp_path / "run"
    path = write(config(run_dir, trainer={"steps": 6, "checkpoint_every": 2}), tmp_path / "run.yaml")
    flag = tmp_path / "in_save"
    env = cli_env() | {
        "RLSTACK_TEST_PAUSE_AT": "checkpoint_save:step_4",
        "RLSTACK_TEST_PAUSE_FLAG": str(flag),
    }
    proc = subprocess.Popen(
        [*CLI, "train", str(path), "--no-progress"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: flag.exists() or proc.poll() is not None, "the step-4 save", timeout=600)
        assert proc.poll() is None, "the run ended before its step-4 save"
        os.killpg(proc.pid, signal.SIGKILL)  # the run, its Ray and every actor, inside the save
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_2"
    assert not (checkpoints / "step_4").exists()
    assert any(p.name.startswith(".staging-step_4") for p in checkpoints.iterdir())  # the half-written save
    killed_scratch = engine_scratch_dirs() - scratch_before
    assert killed_scratch, "the killed run's engine made no scratch dir in the temp dir"

    resume_to_the_end(path, run_dir, steps=6)
    assert not killed_scratch & engine_scratch_dirs(), "the killed run's engine scratch dir outlived it"
    assert not any(p.name.startswith(".") for p in checkpoints.iterdir())  # the leftover was cleaned up
    assert (checkpoints / "latest").read_text() == "step_6"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_stops_everything_and_resume_continues(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    path = write(config(run_dir, trainer={"steps": 6, "checkpoint_every": 0}), tmp_path / "run.yaml")
    shm_before = shm_bytes()
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*CLI, "train", str(path), "--no-progress"],
            env=cli_env(),
            start_new_session=True,
            stdout=out,
            stderr=out,
        )
    try:
        wait_for(
            lambda: (
                (run_dir / "metrics.jsonl").exists()
                and any(r.get("step") == 2 for r in read_metrics(run_dir))
            ),
            "step 2",
            timeout=600,
        )
        os.kill(proc.pid, signal.SIGTERM)  # the driver only, as `ray job stop` or a scheduler would
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 128 + signal.SIGTERM, log.read_text()[-3000:]
    text = log.read_text()
    assert "stopped by SIGTERM" in text and "--resume" in text
    latest = (run_dir / "checkpoints" / "latest").read_text()
    stopped_at = int(latest.removeprefix("step_"))
    assert 2 <= stopped_at < 6
    _, alive = psutil.wait_procs(session_processes(proc.pid), timeout=30)
    assert alive == [], f"left running after SIGTERM: {[p.name() for p in alive]}"
    assert shm_bytes() <= shm_before + (1 << 20), "/dev/shm grew"
    assert not (run_dir / ".rlstack.lock").exists()

    resume_to_the_end(path, run_dir, steps=6)
