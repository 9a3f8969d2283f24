"""vLLM serves our checkpoint and agrees with our PyTorch model on every sampled token's log-prob."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlstack.rollout.engine import EngineSettings
from rlstack.rollout.parity import check_logprob_parity

pytestmark = pytest.mark.vllm


def _shm_bytes() -> int:
    return sum(e.stat().st_size for e in os.scandir("/dev/shm") if e.is_file(follow_symlinks=False))


def test_vllm_and_pytorch_logprobs_agree(tiny_checkpoint: Path) -> None:
    report = check_logprob_parity(tiny_checkpoint, num_prompts=64, max_tokens=32)
    assert report.num_sequences == 64 and report.num_tokens == 64 * 32
    assert report.sliding_window_exceeded  # the sliding layers' window was actually exercised
    assert report.max_abs_diff < 1e-3, report


def test_sigmoid_router_fix_reaches_spawned_engine_and_shm_is_released(tiny_checkpoint: Path) -> None:
    """With vLLM's default multiprocessing engine the model runs in a spawned process: only the
    entry-point plugin can patch the CPU router there (without it, engine start-up asserts softmax)."""
    shm_before = _shm_bytes()
    report = check_logprob_parity(
        tiny_checkpoint, num_prompts=8, max_tokens=16, settings=EngineSettings(multiprocessing=True)
    )
    assert report.max_abs_diff < 1e-3, report
    assert _shm_bytes() <= shm_before + (1 << 20), "the engine left shared memory behind"
