"""The puzzle verifier and the time-limited worker underneath the math verifier."""

from __future__ import annotations

import doctest
import subprocess
import sys
import threading
import time

import pytest

import rlstack.rewards.puzzle as puzzle_module
import rlstack.rewards.timelimit as timelimit_module
from rlstack.rewards.puzzle import check_expression, puzzle_reward
from rlstack.rewards.timelimit import Failure, TimeLimitedWorker

NUMS = [3, 4, 4, 8]


@pytest.mark.parametrize(
    ("expr", "ok"),
    [
        ("(8-3)*4+4", True),
        ("4+4*(8-3)", True),
        ("4 + (8 - 3) * 4", True),  # spaces
        ("(8-3)\\times 4+4", True),  # LaTeX times
        ("(8-3)\\cdot4+4=24", True),  # a trailing =target
        ("(8-3)*4+4=25", False),  # ... that is not the target
        ("8*3", False),  # numbers unused
        ("(8-3)*4+4+3", False),  # a number used twice
        ("(8-3)*4+5", False),  # a number not given
        ("(8-3)*4*4", False),  # right numbers, wrong value
        ("(8-3)*4+4.0", False),  # not an integer literal
        ("-(3-8)*4+4", False),  # unary minus
        ("(8-3)**4+4", False),  # power
        ("(8/4)*3*4", False),  # division
        ("__import__('os').system('true')", False),  # code is never run
        ("(" * 300 + "8-3" + ")" * 300 + "*4+4", False),  # too long / too deep
        ("", False),
        ("(8-3*4+4", False),  # unbalanced
        ("08-3*4+4", False),
    ],
)
def test_check_expression(expr: str, ok: bool) -> None:
    assert check_expression(expr, NUMS, 24) is ok


def test_puzzle_reward_columns() -> None:
    completions = ["so \\boxed{(8-3)*4+4}", "\\boxed{(8-3)*4+4}", "24", "\\boxed{13-(2+1)*3}"]
    out = puzzle_reward(
        ["p"] * 4, completions, numbers=[NUMS, "3 4 4 8", [1, 2], "1, 2, 3, 13"], target=[24, "24", 3, 4]
    )
    assert out == [1.0, 1.0, 0.0, 1.0]
    assert puzzle_reward(["p"] * 2, completions[:2], numbers=[NUMS, None], target=[24, 24]) == [1.0, None]
    assert puzzle_reward(["p"], completions[:1]) == [None]  # not a puzzle dataset
    chat = [[{"role": "assistant", "content": completions[0]}]]
    assert puzzle_reward(["p"], chat, numbers=[NUMS], target=[24]) == [1.0]


def test_worker_timeout_crash_error_and_recovery() -> None:
    with TimeLimitedWorker("time:sleep", time_limit=0.3, memory_limit_mb=None) as w:
        start = time.monotonic()
        assert w.map([(0,), (30,), (0.01,)]) == [None, Failure.TIMEOUT, None]
        assert time.monotonic() - start < 5
        assert (w.stats.timeouts, w.stats.zygote_starts, w.stats.forks) == (1, 1, 2)
    with TimeLimitedWorker("os:_exit", time_limit=5.0) as w:
        assert w.map([(3,)]) == [Failure.CRASH]
        assert w.stats.crashes == 1
    with TimeLimitedWorker("operator:neg", time_limit=5.0) as w:
        assert w.map([(1,)]) == [-1]
        w._procs.zygote.kill()  # type: ignore[union-attr]  # e.g. the OOM killer; its worker follows
        w._procs.zygote.wait()  # type: ignore[union-attr]
        first, second = w.map([(2,), (3,)])
        assert first in (Failure.CRASH, -2) and second == -3  # at worst the next call is lost

        assert w.stats.zygote_starts == 2
    with TimeLimitedWorker("builtins:int", time_limit=5.0) as w:
        assert w.map([("12",), ("twelve",), ("7",)]) == [12, Failure.ERROR, 7]
        assert "ValueError" in w.stats.last_error
    with TimeLimitedWorker("math:factorial", time_limit=0.3) as w:  # a C call that ignores signals
        assert w.map([(10**7,)]) == [Failure.TIMEOUT]


def test_worker_from_several_threads() -> None:
    with TimeLimitedWorker("operator:mul", time_limit=5.0) as w:
        results: dict[int, list[object]] = {}

        def work(i: int) -> None:
            results[i] = w.map([(i, j) for j in range(20)])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {i: [i * j for j in range(20)] for i in range(4)}
        assert (w.stats.zygote_starts, w.stats.forks) == (1, 1)


CALLER = """
import os, threading, time
from rlstack.rewards.timelimit import TimeLimitedWorker
w = TimeLimitedWorker("math:factorial", time_limit=60)
threading.Thread(target=w.map, args=([(10**8,)],), daemon=True).start()  # minutes inside one C call
while w.pid is None:
    time.sleep(0.01)
time.sleep(0.2)
print(w._procs.zygote.pid, w.pid, flush=True)
os.kill(os.getpid(), 9)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has exited
    except FileNotFoundError:
        return False


def test_workers_die_with_their_caller() -> None:
    """Even a worker busy in a C call holding the GIL goes when the process that started it is killed."""
    caller = subprocess.Popen([sys.executable, "-c", CALLER], stdout=subprocess.PIPE, text=True)
    assert caller.stdout is not None
    zygote, worker = map(int, caller.stdout.readline().split())  # not read(): orphans would hold the pipe
    caller.wait(timeout=60)
    caller.stdout.close()
    deadline = time.monotonic() + 5
    while (_alive(zygote) or _alive(worker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(zygote) and not _alive(worker)


def test_worker_that_cannot_start() -> None:
    w = TimeLimitedWorker("no_such_module_xyz:f", time_limit=1.0, start_timeout=30)
    with pytest.raises(RuntimeError, match="worker for no_such_module_xyz:f did not start"):
        w.map([(1,)])
    with pytest.raises(ValueError, match="time_limit must be > 0"):
        TimeLimitedWorker("operator:add", time_limit=0)


def test_doctests() -> None:
    for module in (puzzle_module, timelimit_module):
        assert doctest.testmod(module).failed == 0, module.__name__
