"""The environment an engine starts in: thread count (Ray actors default to 1 thread per reserved CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from rlstack.rollout.engine import EngineSettings, _engine_env


@pytest.fixture
def thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record torch.set_num_threads calls instead of making them: a vLLM-CPU engine started earlier in this
    process replaces that function with a no-op, so the thread count itself cannot be read back."""
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray gives an actor with num_cpus=1
    return calls


def test_num_threads_is_set_before_the_engine_starts(thread_calls: list[int]) -> None:
    with _engine_env(EngineSettings(num_threads=2)) as scratch:
        assert thread_calls == [2] and os.environ["OMP_NUM_THREADS"] == "2"
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and os.path.isdir(scratch)
    os.rmdir(scratch)


def test_no_num_threads_keeps_the_process_setting(thread_calls: list[int]) -> None:
    with _engine_env(EngineSettings()) as scratch:
        assert thread_calls == [] and os.environ["OMP_NUM_THREADS"] == "1"
    os.rmdir(scratch)
