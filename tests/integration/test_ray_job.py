"""`ray job submit -- rlstack train ...` against a real local Ray cluster (token auth on, as Ray 2.60 has)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.deepspeed]

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit_job(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """`ray job submit`, again while the head says its job agent has not registered yet (Ray asks the client
    to "try again later"; under load the agent can come up seconds after `ray start` returns)."""
    deadline = time.monotonic() + 120
    while True:
        job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(2)


def test_ray_job_submit_trains_and_writes_a_vllm_loadable_checkpoint(tmp_path: Path) -> None:
    ray_tmp = Path(tempfile.mkdtemp(prefix="rlsj-"))  # short: Ray's socket paths must stay < 108 chars
    dashboard = free_port()
    env = os.environ | {"RAY_AUTH_MODE": "token", "VLLM_LOGGING_LEVEL": "ERROR"}
    start = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
        "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard), "--temp-dir", str(ray_tmp), "--disable-usage-stats",
    ]  # fmt: skip
    subprocess.run(start, check=True, env=env, capture_output=True)
    try:
        run_dir = tmp_path / "job_run"
        config = tmp_path / "job.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "trainer": {
                        "run_dir": str(run_dir),
                        "steps": 2,
                        "prompts_per_step": 4,
                    },
                    "rollout": {"sampling": {"n": 2, "max_tokens": 16}},
                    "eval": {"num_problems": 4, "samples": 1},
                }
            )
        )
        address = f"http://127.0.0.1:{dashboard}"
        submit = [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--",
            str(BIN / "rlstack"),
            "train",
        ]
        submit += [str(config), "--no-progress"]

        unauthenticated = os.environ | {"RAY_AUTH_MODE": "disabled"}
        refused = submit_job(submit, unauthenticated, timeout=120)
        assert refused.returncode != 0, "a submit without the cluster's token was accepted"
        assert not run_dir.exists()

        job = submit_job(submit, env, timeout=420)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        job_id = re.search(r"raysubmit_\w+", job.stdout + job.stderr).group(0)
        status = subprocess.run(
            [str(BIN / "ray"), "job", "status", "--address", address, job_id],
            env=env,
            capture_output=True,
            text=True,
        )
        assert f"Job '{job_id}' succeeded" in re.sub(r"\x1b\[[0-9;]*m", "", status.stdout), status.stdout
        checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
        assert (checkpoint / "model.safetensors").exists()
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    from rlstack.rollout.engine import close_llm, make_llm

    llm = make_llm(checkpoint)  # the job's final checkpoint serves in vLLM directly
    try:
        out = llm.generate(["<|user|>What is 12+34?<|assistant|>"], use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) > 0
    finally:
        close_llm(llm)
