"""A torch-extension build lock left by a killed process fails the learner's start at once, naming it."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from rlstack.learner.engine import STALE_BUILD_LOCK_S, check_build_lock


def test_a_stale_build_lock_is_named_and_a_fresh_one_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    check_build_lock()  # no build directory, no lock: nothing to say
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(exist_ok=True)
    lock.touch()
    check_build_lock()  # a build in progress (young lock): DeepSpeed waits for it
    old = time.time() - STALE_BUILD_LOCK_S - 10
    os.utime(lock, (old, old))
    message = f"{re.escape(str(lock))}.*killed while building DeepSpeed's shm op.*Delete it"
    with pytest.raises(RuntimeError, match=message):
        check_build_lock()
