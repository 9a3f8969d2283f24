"""Shared fixtures: tiny checkpoints written once per session into pytest's temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
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


# What rlstack and vLLM put in the temp dir and must remove (engine scratch dirs, vLLM's torch.distributed
# file stores, sandbox work dirs, images, Chromium profiles): anything of these made during the session and
# still there at its end fails the session, naming it.
TEMP_LEFTOVERS = ("rlstack-*", "vllm_dist_*")
_TEMP_BEFORE = pytest.StashKey[set[Path]]()


def _temp_entries() -> set[Path]:
    tmp = Path(tempfile.gettempdir())
    return {path for pattern in TEMP_LEFTOVERS for path in tmp.glob(pattern)}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_TEMP_BEFORE] = _temp_entries()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = sorted(_temp_entries() - session.config.stash.get(_TEMP_BEFORE, set()))
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "the tests left these in the temp dir: " + ", ".join(map(str, left))
        if reporter is not None:
            reporter.write_line(f"FAILED {message}", red=True)
        else:
            print(message, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
