"""Deadlines scale with the work; SIGINT / SIGTERM become a stop request, the second one an interrupt."""

from __future__ import annotations

import os
import signal

import pytest

from rlstack.faults import ActorFailure, Deadlines, FaultsConfig, StopSignals


def test_deadlines_scale_with_the_work_unless_fixed() -> None:
    scaled = Deadlines(FaultsConfig(deadline_base_s=100, deadline_per_token_s=0.01, deadline_per_mb_s=2), 50)
    assert scaled.generate(1000) == pytest.approx(110)
    assert scaled.learner(20_000) == pytest.approx(300)
    assert scaled.weights() == pytest.approx(200)
    fixed = Deadlines(FaultsConfig(generate_timeout_s=7, train_timeout_s=8, sync_timeout_s=9), 50)
    assert (fixed.generate(10**9), fixed.learner(10**9), fixed.weights()) == (7, 8, 9)


def test_an_actor_failure_names_the_actors_the_call_and_the_step() -> None:
    names = ["rollout worker 0 (pid 11)", "rollout worker 1 (pid 12)"]
    hung = ActorFailure("generate", names, [1], True, "no result within the 20 s deadline", step=3)
    assert (
        str(hung)
        == "rollout worker 1 (pid 12) did not answer `generate` at step 3: no result within the 20 s deadline"
    )
    died = ActorFailure("train", ["learner rank 0"], [0], False, "The actor died", step=None)
    assert str(died) == "learner rank 0 died during `train`: The actor died"


def test_the_first_signal_requests_a_stop_the_second_interrupts() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_checkpoint_size_counts_only_weight_files(tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0" * (3 * 2**20))
    (tmp_path / "tokenizer.json").write_bytes(b"\0" * (5 * 2**20))
    assert Deadlines.checkpoint_mb(tmp_path) == pytest.approx(3.0)
    assert Deadlines.checkpoint_mb(tmp_path / "absent") == 1.0
