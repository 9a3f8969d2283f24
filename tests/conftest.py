"""Shared fixtures: tiny checkpoints written once per session into pytest's temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Every metric a test logs through MetricsSink must be in rlstack/monitor/registry.py (docs/metrics.md).
os.environ.setdefault("RLSTACK_STRICT_METRICS", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Step3p5 policy with peaked (std 0.2) random weights, so that wrong attention windows,
    routing or norms change log-probs by whole nats rather than by 1e-6 on a near-uniform model."""
    from rlstack.model import init_checkpoint, tiny

    config = tiny()
    config.initializer_range = 0.2
    return init_checkpoint(config, tmp_path_factory.mktemp("tiny_policy"), seed=0)


@pytest.fixture
def fresh_python() -> Callable[[str], subprocess.CompletedProcess[str]]:
    """Run Python code in a new interpreter with the repo importable (what a module import loads shows only
    in a fresh process); returns the finished process, output captured as text."""

    def run(code: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )

    return run
