"""Across nodes: a Ray cluster of two nodes on this machine (a head and a worker node, each its own
`ray start` with its own custom resource) runs a short job with the rollout worker on one node and the
learner on the other, placed by `rollout.ray_resources` / `learner.ray_resources`; the run's placement
record (placement.json and metrics.jsonl) names the node of each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from ray_nodes import LocalRayCluster

from rlstack.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm, pytest.mark.deepspeed]

HERE = Path(__file__).parent
REPO = HERE.parent.parent


def test_rollout_and_learner_run_on_the_nodes_their_resources_name(tmp_path: Path) -> None:
    # The nodes' processes (so the actors) import what the driver does: the repository and toy_rewards.
    pythonpath = os.pathsep.join([str(REPO), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = os.environ | {"PYTHONPATH": pythonpath, "VLLM_LOGGING_LEVEL": "ERROR"}
    run_dir = tmp_path / "two_nodes"
    with LocalRayCluster(env=env, cwd=REPO) as cluster:
        address = cluster.start_head({"learner_node": 1}, num_cpus=2)
        cluster.add_node({"rollout_node": 1}, num_cpus=2)
        nodes = cluster.nodes(expect=2)
        head = cluster.node_id_with("learner_node", nodes)
        worker = cluster.node_id_with("rollout_node", nodes)
        assert head != worker
        assert [n["NodeID"] for n in nodes if n["Resources"].get("node:__internal_head__")] == [head]

        config = {
            "trainer": {
                "run_dir": str(run_dir),
                "steps": 2,
                "prompts_per_step": 2,
                "checkpoint_every": 0,
                "ray_address": address,
            },
            "rollout": {
                "sampling": {"n": 4, "max_tokens": 16},
                "cpus_per_worker": 1,
                "ray_resources": {"rollout_node": 1},
            },
            "learner": {
                "micro_batch_size": 8,
                "zero_stage": 2,
                "lr": 1e-3,
                "cpus_per_rank": 1,
                "ray_resources": {"learner_node": 1},
            },
            "algorithm": {"traj_filter": "off"},
            "eval": {"num_problems": 4, "samples": 1},
            "rewards": [{"import_path": "toy_rewards:digit_fraction"}],
            "reward_workers": {"num_workers": 0},  # scored in the driver
        }
        config_path = tmp_path / "two_nodes.yaml"
        config_path.write_text(yaml.safe_dump(config))
        started = time.monotonic()
        job = subprocess.run(
            [sys.executable, "-m", "rlstack.cli", "train", str(config_path), "--no-progress"],
            env=cluster.env,  # the cluster's auth token; PYTHONPATH and VLLM_LOGGING_LEVEL from `env`
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=420,
        )
        job_s = time.monotonic() - started
        assert job.returncode == 0, f"{(job.stdout + job.stderr)[-4000:]}\n{cluster.logs()}"

        placement = json.loads((run_dir / "placement.json").read_text())
        # The rollout worker's engine processes (its children) ended with the job, though they ran on a
        # node other than the driver's, where the driver's own reaping cannot reach them.
        leftovers = []
        for info in placement["rollout"]:
            for pid in info.get("children", []):
                try:
                    proc = psutil.Process(pid)
                    if proc.create_time() <= info["time"]:
                        leftovers.append(proc)
                except psutil.NoSuchProcess:
                    pass
        _, leftovers = psutil.wait_procs(leftovers, timeout=15)
        assert not leftovers, f"rollout engine processes outlived the job: {leftovers}"
    # Leaving the `with`: both nodes' processes are stopped (SIGTERM, then SIGKILL) and checked gone.
    assert not cluster.processes()
    assert not cluster.base.exists()

    records = read_metrics(run_dir)
    logged = [r for r in records if "placement" in r]
    assert [r["step"] for r in logged] == [0]
    assert logged[0]["placement"] == placement  # the metrics record is the placement.json one
    print(f"job {job_s:.0f} s; placement: {json.dumps(placement)}")

    assert [w["node"] for w in placement["rollout"]] == [worker]
    assert [r["node"] for r in placement["learner"]] == [head]
    assert placement["driver"]["node"] in {head, worker}
    assert all(w["pid"] != placement["driver"]["pid"] for w in placement["rollout"])
    trained = {r["step"]: r for r in records if "actor/loss" in r}
    assert sorted(trained) == [1, 2]
    assert all(trained[s]["reward/toy_rewards:digit_fraction"] >= 0 for s in (1, 2))
