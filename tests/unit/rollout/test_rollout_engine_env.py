"""The environment an engine starts in: thread count (Ray actors default to 1 thread per reserved CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from rlstack.rollout.engine import EngineSettings, _engine_env


@pytest.fixture
def restore_threads():
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


def test_num_threads_is_set_before_the_engine_starts(restore_threads) -> None:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # what Ray gives an actor with num_cpus=1
    with _engine_env(EngineSettings(num_threads=2)) as scratch:
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and os.path.isdir(scratch)
    os.rmdir(scratch)


def test_no_num_threads_keeps_the_process_setting(restore_threads) -> None:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    with _engine_env(EngineSettings()) as scratch:
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    os.rmdir(scratch)
