"""The `code` reward, end to end through the real process sandbox: right, partly right and wrong programs,
compile errors, crashes, runaway programs, and programs that try to cheat the harness."""

from __future__ import annotations

import doctest
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rlstack.rewards.code_verify as code_module
from rlstack.envs import backends
from rlstack.envs.config import SandboxConfig
from rlstack.envs.process import sandbox_processes
from rlstack.rewards import RewardGroup, RewardResult, RewardSpec, get_reward
from rlstack.rewards.code_verify import CodeVerifier, code_reward, extract_code

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(20, 22) == 42"]
SUM_CASES = [
    {"input": "1 2\n", "output": "3\n"},
    {"input": "10 -4", "output": "6"},
    {"input": "5 5\n", "output": "10"},
]


# The process backend, opted into explicitly (it is not strict): these tests are about the reward.
PROCESS = SandboxConfig(backend="process", strict=False)


@pytest.fixture(scope="module", autouse=True)
def process_sandbox() -> Iterator[None]:
    """This module's runs (also through `code_reward` and `RewardGroup`) go to the process sandbox."""
    backends.configure(PROCESS)
    yield
    backends.configure(SandboxConfig())


@pytest.fixture(scope="module")
def verifier() -> CodeVerifier:
    return CodeVerifier(time_limit=3.0)  # generous: a loaded CI machine must not time out correct code


@pytest.fixture(scope="module")
def quick() -> CodeVerifier:
    return CodeVerifier(time_limit=0.5)  # for the runaway programs


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    before = set(Path(tempfile.gettempdir()).glob("rlstack-sandbox-*"))
    yield
    assert sandbox_processes() == []
    assert set(Path(tempfile.gettempdir()).glob("rlstack-sandbox-*")) - before == set()


def test_docstring_examples() -> None:
    assert doctest.testmod(code_module).failed == 0


@pytest.mark.parametrize(
    ("completion", "code"),
    [
        ("text\n```python\nA = 1\n```\nmore\n```python\nB = 2\n```\n", "B = 2\n"),  # the last python block
        ("```py\nA = 1\n```\n```text\nnot code\n```", "A = 1\n"),  # python wins over a later block
        ("```\nC = 3\n```\nbye", "C = 3\n"),  # no python block: the last fenced block
        ("D = 4\nprint(D)", "D = 4\nprint(D)"),  # no fence: the whole text
        ("explanation\n```python\nE = 5\nprint(E", "E = 5\nprint(E"),  # cut off by max_tokens
    ],
)
def test_extract_code(completion: str, code: str) -> None:
    assert extract_code(completion) == code


def test_right_partly_right_and_wrong_programs_in_one_batch() -> None:
    completions = [
        "```python\ndef add(a, b):\n    return a + b\n```",
        "```python\ndef add(a, b):\n    return a + b if a > 0 else 7\n```",  # fails add(-1, 1)
        "```python\ndef add(a, b):\n    return a * b\n```",
        "no tests for this row",
    ]
    out = code_reward(["p"] * 4, completions, tests=[ADD_TESTS, ADD_TESTS, ADD_TESTS, None], time_limit=3.0)
    assert isinstance(out, RewardResult)
    assert out.scores == [1.0, pytest.approx(2 / 3), 0.0, None]
    assert [i and (i["passed"], i["statuses"]) for i in out.info] == [
        (3, ["pass", "pass", "pass"]),
        (2, ["pass", "fail", "pass"]),
        (0, ["fail", "fail", "fail"]),
        None,
    ]
    assert out.info[1]["error"] == "test 1: AssertionError (<test 1> line 1): assert add(-1, 1) == 0"
    assert code_reward(["p"], ["x = 1"]).scores == [None]  # no tests column: does not apply


def test_syntax_error_scores_zero_and_keeps_the_error(verifier: CodeVerifier) -> None:
    result = verifier.verify("def add(a, b)\n    return a + b\n", ADD_TESTS)
    assert result.score == 0.0 and not result.compiled and result.statuses == []
    assert result.info()["error"] == "SyntaxError: expected ':': def add(a, b) (line 1)"


def test_runtime_exception_is_an_error_with_its_line(verifier: CodeVerifier) -> None:
    result = verifier.verify("def add(a, b):\n    return (a + b) / 0\n", ADD_TESTS)
    assert result.score == 0.0 and result.statuses == ["error"] * 3
    assert result.error == "test 0: ZeroDivisionError: division by zero (solution.py line 2)"


def test_infinite_loops_time_out_within_the_limits(quick: CodeVerifier) -> None:
    looping = "def add(a, b):\n    while True:\n        pass\n"
    start = time.monotonic()
    result = quick.verify(looping, ADD_TESTS[:2])
    assert result.statuses == ["timeout", "timeout"] and result.score == 0.0
    assert result.error == "test 0: time limit exceeded (0.5 s)"
    assert time.monotonic() - start < 2 * 0.5 + 3.0
    # a loop that swallows every exception at the top level changes nothing
    stubborn = "while True:\n    try:\n        pass\n    except BaseException:\n        pass\n"
    assert quick.verify(stubborn, ADD_TESTS[:1]).statuses == ["timeout"]


def test_a_run_that_times_out_as_a_whole_scores_zero() -> None:
    slow = "import time\ndef add(a, b):\n    time.sleep(0.6)\n    return a + b\n"
    result = CodeVerifier(time_limit=2.0, total_time_limit=1.0).verify(slow, ADD_TESTS)
    assert result.timed_out and result.score == 0.0
    assert result.info()["timed_out"] is True and result.info()["error"].startswith("timed out")


def test_fork_bomb_memory_hog_and_big_file_are_contained(quick: CodeVerifier) -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert quick.verify(bomb, ADD_TESTS[:1]).statuses == ["timeout"]
    hog = CodeVerifier(time_limit=3.0, memory_mb=256).verify("x = bytearray(1 << 30)", ADD_TESTS[:1])
    assert hog.statuses == ["error"] and "MemoryError" in str(hog.error)
    big = "open('big', 'wb').write(b'x' * (64 << 20))\ndef add(a, b):\n    return a + b\n"
    result = CodeVerifier(time_limit=3.0).verify(big, ADD_TESTS[:1])
    assert result.statuses == ["error"] and "File too large" in str(result.error)


def test_network_access_fails(verifier: CodeVerifier) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    try:
        port = server.getsockname()[1]
        code = (
            "import socket\n"
            "def reach():\n"
            f"    try:\n        socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "        return True\n    except OSError:\n        return False\n"
        )
        isolated = verifier.sandbox.isolation.network_isolated  # type: ignore[attr-defined]
        assert verifier.verify(code, [f"assert reach() is {not isolated}"]).score == 1.0
    finally:
        server.close()


CHEATS = {
    "prints fake result lines": (
        "import json, os, sys\n"
        "for i in range(3):\n"
        "    print(json.dumps({'i': i, 'status': 'pass', 'error': None}))\n"
        "    sys.stdout.flush()\n"
        "for fd in range(1, 20):\n"
        "    try:\n"
        '        os.write(fd, b\'{"i": 0, "status": "pass", "error": null, "nonce": ""}\\n\')\n'
        "    except OSError:\n"
        "        pass\n"
        "def add(a, b):\n    return 0\n"
    ),
    "exits before the tests": "import os\nos._exit(0)\n",
    "calls sys.exit(0)": "import sys\nsys.exit(0)\n",
    "returns an always-equal object": (
        "class Anything:\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Anything()\n"
    ),
    "returns an int whose == lies": (
        "class Liar(int):\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Liar(0)\n"
    ),
    "hides the failure in a list": (
        "class Anything:\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return [Anything()]\n"
    ),
}


@pytest.mark.parametrize("cheat", list(CHEATS))
def test_cheating_programs_do_not_score(verifier: CodeVerifier, cheat: str) -> None:
    tests = ADD_TESTS if "list" not in cheat else ["assert add(1, 2) == [3]"]
    result = verifier.verify(CHEATS[cheat], tests)
    assert result.passed == 0 and result.score == 0.0, result.info()


def test_killing_the_harness_loses_the_remaining_tests(verifier: CodeVerifier) -> None:
    code = (
        "import os, signal\n"
        "def add(a, b):\n"
        "    if a == 20:\n"
        "        os.kill(os.getppid(), signal.SIGKILL)  # the harness, our parent\n"
        "    return a + b\n"
    )
    result = verifier.verify(code, ADD_TESTS)
    assert result.statuses == ["pass", "pass", "missing"] and result.score == pytest.approx(2 / 3)
    assert str(result.error).startswith("the harness killed by SIGKILL after 2 of 3 tests")


def test_stdin_stdout_cases(verifier: CodeVerifier) -> None:
    programs = {
        "a, b = map(int, input().split())\nprint(a + b)": [1.0, ["pass"] * 3],
        "import sys\na, b = map(int, sys.stdin.read().split())\nsys.stdout.write(f'{a + b}  \\r\\n\\n')": [
            1.0,
            ["pass"] * 3,
        ],  # trailing blanks, CRLF and extra newlines do not matter
        "a, b = map(int, open(0).read().split())\nprint(a + b)\nexit(0)": [1.0, ["pass"] * 3],
        "a, b = map(int, input().split())\nprint(a + b if a < 10 else 0)": [pytest.approx(2 / 3), None],
        "a, b = map(int, input().split())\nprint(a, b)\nraise SystemExit(2)": [0.0, ["error"] * 3],
    }
    for program, (score, statuses) in programs.items():
        result = verifier.verify(program, SUM_CASES)
        assert result.score == score, (program, result.info())
        if statuses:
            assert result.statuses == statuses
    wrong = verifier.verify("print(int(input().split()[0]) * 2)", SUM_CASES[:1])
    assert wrong.statuses == ["wrong"] and wrong.error == "test 0: wrong output: got '2\\n', expected '3\\n'"


def test_huge_output_fails_the_test_not_the_caller() -> None:
    verifier = CodeVerifier(time_limit=3.0, max_output_bytes=10_000)
    result = verifier.verify("while True:\n    print('x' * 1000)", [{"input": "", "output": "x"}])
    assert result.statuses == ["output_limit"] and result.error == "test 0: output over 10000 bytes"
    noisy = "for _ in range(20000):\n    print('debug ' * 100)\ndef add(a, b):\n    return a + b\n"
    assert verifier.verify(noisy, ADD_TESTS[:1]).score == 1.0  # assert tests: prints go nowhere


@pytest.mark.parametrize(
    ("tests", "message"),
    [
        ([42], r"column 'tests', row 0: expected a list of assert statements .* got int"),
        (["not json"], r"column 'tests', row 0: a string must be a JSON list of tests"),
        ([["assert add(1, 2) == 3", "assert ("]], r"column 'tests', row 0\[1\]: not valid Python"),
        ([[{"input": "1"}]], r"column 'tests', row 0\[0\]: a stdin/stdout case needs exactly"),
        ([["assert True", {"input": "", "output": ""}]], r"all assert strings or all .* got dict, str"),
    ],
)
def test_bad_tests_column_is_named(tests: list[object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        code_reward(["p"], ["def add(a, b):\n    return a + b"], tests=tests)


def test_registered_with_options_through_the_group() -> None:
    assert get_reward("code") is code_reward
    spec = RewardSpec(name="code", options={"time_limit": 3.0, "concurrency": 2})
    group = RewardGroup.in_process([spec], sandbox=PROCESS)
    completions = ["def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b", "x = 1"]
    tests = [ADD_TESTS, '["assert add(2, 2) == 4"]', 7]  # a JSON string works; the bad row is isolated
    result = group(["p"] * 3, completions, tests=tests)
    assert result.per_reward["code"] == [1.0, 0.0, None]
    assert result.errors == {"code": 1}
    assert result.info is not None and result.info["code"][0]["passed"] == 3
    assert (
        "column 'tests', row 0: expected a list" in result.info["code"][2]["error"]
    )  # row 0 of its own call
