"""Dashboards on a real training run: `rlstack train` (async, MoE, every sink on) runs in a subprocess while
the live dashboard watches it in headless Chromium (a refresh shows a new step; the finished run's plotted
series equal metrics.jsonl, tokens are coloured); then the report of the finished run, checked the same
way; then the TensorBoard, W&B (offline) and MLflow (file store) stores read back against metrics.jsonl."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from report_checks import (
    assert_coloured_tokens,
    assert_no_console_errors,
    assert_plotted_equals_metrics,
    panel_text,
    wait_ready,
)
from sink_readback import expected, read_back

from rlstack.metrics import read_metrics
from rlstack.monitor.chromium import Chromium
from rlstack.monitor.report import serve, write_report
from rlstack.monitor.samples import LOG_RATIO, token_files

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.deepspeed]

STEPS = 4
PANELS = {  # panel -> metrics.jsonl keys whose plotted points must equal the file's
    "reward": ["reward/mean"],
    "eval": ["eval/greedy_accuracy"],
    "length": ["response/length_mean"],
    "acceptance": ["filter/token_accept"],
    "time": ["time/generate", "time/train"],
}


def _config(run_dir: Path) -> dict:
    return {
        "trainer": {"run_dir": str(run_dir), "steps": STEPS, "prompts_per_step": 4, "mode": "async"},
        "rollout": {"sampling": {"n": 4, "max_tokens": 24}},
        "learner": {"micro_batch_size": 16, "zero_stage": 2, "lr": 1e-3},
        "eval": {"num_problems": 8, "samples": 1},
        "rewards": [{"import_path": "toy_rewards:digit_fraction"}],
        "logging": {"sinks": ["tensorboard", "wandb", "mlflow"], "progress_every_s": 0.001},
    }


def _env(tmp_path: Path) -> dict[str, str]:
    """W&B offline with its caches and settings under tmp_path; the test's reward module importable."""
    home = tmp_path / "wandb_home"
    wandb_dirs = {
        var: str(home / var.lower()) for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")
    }
    return (
        os.environ
        | wandb_dirs
        | {
            "WANDB_MODE": "offline",
            "VLLM_LOGGING_LEVEL": "ERROR",
            "PYTHONPATH": str(Path(__file__).parent),
        }
    )


def _steps_shown(page) -> int:  # type: ignore[no-untyped-def]
    return int(page.eval("window.RLSTACK.data.runs[0].steps_done || 0"))


def test_live_dashboard_report_and_sinks_on_a_real_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config(run_dir)))
    log = tmp_path / "train.log"
    with log.open("w") as out:  # stdout is a file, not a terminal: plain progress lines
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlstack.cli", "train", str(config)],
            env=_env(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with Chromium() as browser:
            # ---- the live dashboard, while the run goes
            deadline = time.time() + 400
            while not any("actor/loss" in r for r in _records(run_dir)):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "no training step within 400 s"
                time.sleep(0.5)
            server = serve([run_dir], port=0, refresh_s=0.5)
            try:
                page = browser.open(server.url)
                wait_ready(page)
                first = _steps_shown(page)
                assert first >= 1
                # one refresh that shows a new step, without reloading the page
                page.eval("window.__same_document = true")
                page.wait_for(f"window.RLSTACK.data.runs[0].steps_done > {first}", timeout=300)
                assert page.eval("window.__same_document") is True
                later = _steps_shown(page)
                status = page.eval("document.getElementById('live-status').innerText")
                assert f"last step {later}" in status, status
                assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
                # the finished run, as the page shows it after its next refreshes
                _eventually(lambda: assert_plotted_equals_metrics(page, run_dir, PANELS) == 6)
                assert_coloured_tokens(page)
                assert_no_console_errors(page)
                page.screenshot(tmp_path / "dashboard.png")
            finally:
                server.close()

            # ---- the report of the finished run
            report = write_report([run_dir], tmp_path / "report.html")
            page = browser.open(report.as_uri())
            wait_ready(page)
            assert_no_console_errors(page)
            assert assert_plotted_equals_metrics(page, run_dir, PANELS) == 6
            for panel in ("log_ratio_version", "expert_load", "staleness_hist", "routing"):
                assert "no " not in panel_text(page, panel).lower()[:40], panel_text(page, panel)
            assert_coloured_tokens(page)
            page.screenshot(tmp_path / "report.png")
        print(f"screenshots: {tmp_path / 'dashboard.png'}, {tmp_path / 'report.png'}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # ---- plain progress lines in the log (stdout was not a terminal)
    lines = [line for line in log.read_text().splitlines() if line.startswith("train step ")]
    assert [line.split()[2] for line in lines] == [f"{s}/{STEPS}" for s in range(1, STEPS + 1)], lines
    assert all(" eta " in line and " reward " in line and " tok/s " in line for line in lines), lines

    # ---- per-token samples and log-ratio quantiles, as the report read them
    assert list(token_files(run_dir)) == list(range(1, STEPS + 1))
    rows = pq.read_table(token_files(run_dir)[STEPS]).to_pylist()
    assert rows and all(len(r["tokens"]) == len(r["token_ids"]) == len(r["train_logp"]) for r in rows)
    ratios = [json.loads(line) for line in (run_dir / LOG_RATIO).read_text().splitlines()]
    assert [r["step"] for r in ratios] == list(range(1, STEPS + 1))
    assert all(r["by_version"] for r in ratios)

    # ---- utilisation against this machine's measured peak (rlstack.perf)
    trained = [r for r in read_metrics(run_dir) if "actor/loss" in r]
    assert all(0.0 < r["perf/mfu"] < 1.0 and r["perf/rollout_tokens_per_s"] > 0 for r in trained), trained

    # ---- every sink holds what metrics.jsonl holds
    for sink in ("tensorboard", "wandb", "mlflow"):
        got, want = read_back(run_dir, sink), expected(run_dir, sink)
        assert "reward/mean" in want and got == want, sink
    leftover = [
        p.pid for p in psutil.process_iter(["cmdline"]) if "wandb-core" in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftover, f"wandb processes left: {leftover}"


def _eventually(check: Callable[[], object], timeout: float = 20.0) -> None:
    """`check()` until it passes (the dashboard redraws every 0.5 s); its last failure after `timeout`."""
    deadline = time.time() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # the last line may be being written
            records.append(json.loads(line))
    return records
