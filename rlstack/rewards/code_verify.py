"""The `code` reward: run the completion's program against the row's tests in a sandbox; the fraction passed.

The program is the last ```python block of the completion (else its last fenced block of any language,
else the whole text). The `tests` column holds, per row, either Python statements run after the program
(`["assert add(1, 2) == 3", ...]`) or stdin/stdout cases (`[{"input": "1 2\\n", "output": "3\\n"}, ...]`,
compared after normalising whitespace); a JSON string of either list works too. All of a completion's
tests run in one sandbox process (rlstack.envs.code_harness: a fork per test, a per-test time limit, an
overall one for the run); expected outputs never enter the sandbox (the harness returns digests).

Scores: passed / total; 0.0 for code that does not compile (the error is kept in the sample's info) or
a run that timed out as a whole; None for rows without tests.

    >>> good, bad = "```python\\ndef add(a, b):\\n    return a + b\\n```", "def add(a, b): return a"
    >>> tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]
    >>> code_reward(["p"] * 2, [good, bad], tests=[tests, tests]).scores
    [1.0, 0.5]
"""

from __future__ import annotations

import ast
import json
import marshal
import os
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from rlstack.config_base import StrictModel
from rlstack.envs import Limits, RunResult, Sandbox, SandboxError, code_harness, get_sandbox
from rlstack.envs.backends import run_sandbox
from rlstack.envs.code_harness import output_digest
from rlstack.rewards.extract import completion_text
from rlstack.rewards.registry import RewardResult, register, split_options

_HARNESS = Path(code_harness.__file__).read_text()  # runs inside the sandbox as harness.py
_FENCE = re.compile(r"^[ \t]*```[ \t]*([^\n`]*)$", re.MULTILINE)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}
_STARTUP_SECONDS = 5.0  # interpreter starts (two) on a loaded machine, on top of the per-test limits
_PER_TEST_OVERHEAD = 0.25  # a fork, a pipe round trip


def extract_code(text: str) -> str:
    """The last ```python block, else the last fenced block, else the whole text. A block left open at the
    end (a completion cut off by max_tokens) runs to the end of the text.

    >>> extract_code("see:\\n```python\\nprint(1)\\n```\\nand\\n```\\nnot this\\n```")
    'print(1)\\n'
    """
    blocks: list[tuple[str, str]] = []  # (language, body)
    fences = list(_FENCE.finditer(text))
    i = 0
    while i < len(fences):
        opening = fences[i]
        closing = fences[i + 1] if i + 1 < len(fences) else None
        body_end = closing.start() if closing else len(text)
        language = (opening.group(1).split() or [""])[0].lower()
        blocks.append((language, text[opening.end() + 1 : body_end]))
        i += 2
    python = [body for language, body in blocks if language in _PYTHON_TAGS]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else text


@dataclass(frozen=True)
class Tests:
    """One row's tests: assert statements, or stdin/stdout cases."""

    mode: str  # "assert" | "io"
    items: tuple[Any, ...]  # str statements, or (input, expected output) pairs

    def __len__(self) -> int:
        return len(self.items)


def parse_tests(value: Any, where: str = "tests") -> Tests | None:
    """A `tests` cell -> `Tests`; None for a missing or empty cell; ValueError naming `where` otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                f"{where}: a string must be a JSON list of tests, got {value[:80]!r}; give a list of assert "
                "statements or of {'input': ..., 'output': ...} cases"
            ) from None
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise ValueError(
            f"{where}: expected a list of assert statements or of {{'input': ..., 'output': ...}} cases, "
            f"got {type(value).__name__}"
        )
    if len(value) == 0:
        return None
    if all(isinstance(t, str) for t in value):
        for j, statement in enumerate(value):
            try:
                compile(statement, f"<test {j}>", "exec", dont_inherit=True)
            except (SyntaxError, ValueError) as e:
                raise ValueError(f"{where}[{j}]: not valid Python ({e}): {statement[:80]!r}") from None
        return Tests("assert", tuple(value))
    if all(isinstance(t, Mapping) for t in value):
        cases = []
        for j, case in enumerate(value):
            if set(case) - {"input", "output"} or not all(
                isinstance(case.get(k), str) for k in ("input", "output")
            ):
                raise ValueError(
                    f"{where}[{j}]: a stdin/stdout case needs exactly the string keys 'input' and 'output', "
                    f"got {dict(case)!r:.120}"
                )
            cases.append((case["input"], case["output"]))
        return Tests("io", tuple(cases))
    kinds = sorted({type(t).__name__ for t in value})
    raise ValueError(
        f"{where}: tests must be all assert strings or all {{'input', 'output'}} dicts, "
        f"got {', '.join(kinds)}"
    )


@dataclass
class CodeResult:
    """The outcome of one program against its tests."""

    passed: int
    total: int
    error: str | None = None
    """The compile error, the first failing test's error, or why the run failed."""
    compiled: bool = True
    timed_out: bool = False
    """The run as a whole hit its time limit (not one test: that test is "timeout" in `statuses`)."""
    statuses: list[str] = field(default_factory=list)
    """Per test: pass, fail, wrong (io output differs), error, timeout, output_limit, crash, missing."""
    seconds: float = 0.0

    @property
    def score(self) -> float:
        if not self.compiled or self.timed_out or self.total == 0:
            return 0.0
        return self.passed / self.total

    def info(self) -> dict[str, Any]:
        """What goes into the run's samples (JSON-serialisable)."""
        info: dict[str, Any] = {"passed": self.passed, "total": self.total, "statuses": self.statuses}
        if self.error:
            info["error"] = self.error
        if self.timed_out:
            info["timed_out"] = True
        info["seconds"] = round(self.seconds, 3)
        return info


class CodeVerifier:
    """Runs programs against tests in a sandbox, `concurrency` programs at a time. Thread-safe.

    time_limit: seconds per test. memory_mb: address space per process. max_output_bytes: stdout allowed
    per io test (more is a failed test). total_time_limit: seconds for one program's whole run (default:
    5 s of start-up plus time_limit + 0.25 s per test). sandbox: a `Sandbox`, a backend name, or None: the
    run's sandbox (`rlstack.envs.backends.run_sandbox`, from the run's `sandbox:` section).
    """

    def __init__(
        self,
        time_limit: float = 2.0,
        memory_mb: int = 512,
        max_output_bytes: int = 1 << 20,
        concurrency: int | None = None,
        total_time_limit: float | None = None,
        sandbox: Sandbox | str | None = None,
    ) -> None:
        if not time_limit > 0:
            raise ValueError(f"code: time_limit must be > 0 seconds, got {time_limit!r}")
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"code: concurrency must be >= 1, got {concurrency!r}")
        self.time_limit, self.memory_mb, self.max_output_bytes = time_limit, memory_mb, max_output_bytes
        self.concurrency = concurrency or len(os.sched_getaffinity(0))
        self.total_time_limit = total_time_limit
        self._sandbox = get_sandbox(sandbox) if isinstance(sandbox, str) else sandbox
        Limits(memory_mb=memory_mb, max_output_bytes=max_output_bytes)  # validates them now

    @property
    def sandbox(self) -> Sandbox:
        """Where programs run: the sandbox given, else the run's (looked up at each use)."""
        return self._sandbox if self._sandbox is not None else run_sandbox()

    def verify(self, code: str, tests: Tests | Any) -> CodeResult:
        """Run `code` against `tests` (a `Tests` or a raw cell: a list of asserts or of io dicts)."""
        parsed = tests if isinstance(tests, Tests) else parse_tests(tests)
        if parsed is None:
            raise ValueError("code: no tests to run")
        messages: list[dict[str, Any]] = [
            {
                "mode": parsed.mode,
                "n": len(parsed),
                "time_limit": self.time_limit,
                "max_output": self.max_output_bytes,
            }
        ]
        if parsed.mode == "assert":
            messages += [{"test": t} for t in parsed.items]
        else:
            messages += [{"input": given} for given, _ in parsed.items]
        stdin = b"".join(b"%d\n%s" % (len(body), body) for body in (marshal.dumps(m, 2) for m in messages))
        biggest_input = max((len(m.get("input", "").encode()) for m in messages), default=0)
        limits = Limits(
            wall_seconds=self.total_time_limit
            or _STARTUP_SECONDS + len(parsed) * (self.time_limit + _PER_TEST_OVERHEAD),
            memory_mb=self.memory_mb,
            max_output_bytes=4096 + 2048 * len(parsed),
            file_size_mb=max(16, 2 * (biggest_input >> 20) + 1),
        )
        run = self.sandbox.run(
            ["python3", "harness.py"], {"harness.py": _HARNESS, "solution.py": code}, stdin, limits
        )
        return self._result(parsed, run)

    @staticmethod
    def _result(tests: Tests, run: RunResult) -> CodeResult:
        """Per-test statuses from the harness's lines; io outputs are judged here, by digest."""
        lines = []
        for line in run.stdout.splitlines():
            try:
                lines.append(ast.literal_eval(line))
            except (ValueError, SyntaxError):
                continue  # the truncation marker; nothing else writes to the harness's stdout
        lines = [line for line in lines if isinstance(line, dict)]
        if run.status == "error":  # the sandbox failed, not the code: unscored, never a 0
            raise SandboxError(f"the code sandbox could not run the tests: {run.detail}")
        timed_out = run.status == "timeout"
        result = CodeResult(0, len(tests), timed_out=timed_out, seconds=run.wall_seconds)
        if lines and "compile_error" in lines[0]:
            result.compiled, result.error = False, lines[0]["compile_error"]
            return result
        reports = {r["i"]: r for r in lines if "i" in r}
        for i in range(len(tests)):
            report = reports.get(i)
            status = "missing" if report is None else report["status"]
            error = None if report is None else report.get("error")
            if status == "ran":
                assert report is not None  # the status came from the report
                expected = tests.items[i][1]
                status = "pass" if report["digest"] == output_digest(expected) else "wrong"
                if status == "wrong":
                    error = f"wrong output: got {report['head']!r:.120}, expected {expected[:100]!r}"
            elif status == "fail" and tests.mode == "assert":
                error = f"{error}: {tests.items[i][:200]}"
            result.statuses.append(status)
            result.passed += status == "pass"
            if result.error is None and error:
                result.error = f"test {i}: {error}"
        if timed_out:
            result.error = f"timed out: the run took over {run.wall_seconds:.1f} s" + (
                f" ({result.error})" if result.error else ""
            )
        elif len(reports) < len(tests) and result.error is None:
            how = "stopped" if run.status == "ok" else run.describe()
            result.error = (
                f"the harness {how} after {len(reports)} of {len(tests)} tests: {run.stderr[-300:]}"
            )
        return result

    def verify_many(self, jobs: Sequence[tuple[str, Tests]]) -> list[CodeResult]:
        """`verify` for each (code, tests), `concurrency` at a time, in order."""
        if len(jobs) <= 1 or self.concurrency == 1:
            return [self.verify(code, tests) for code, tests in jobs]
        with ThreadPoolExecutor(min(self.concurrency, len(jobs)), thread_name_prefix="rlstack-code") as pool:
            return list(pool.map(lambda job: self.verify(*job), jobs))

    def score(self, completions: Sequence[Any], tests: Sequence[Any] | None) -> RewardResult:
        """Scores and per-sample info for a batch; rows with no tests score None."""
        n = len(completions)
        if tests is None:
            return RewardResult([None] * n, [None] * n)
        if isinstance(tests, str | bytes) or not isinstance(tests, Sequence) or len(tests) != n:
            got = f"{len(tests)} rows" if isinstance(tests, Sequence) else type(tests).__name__
            raise ValueError(f"code: column 'tests' must have one entry per completion ({n}), got {got}")
        parsed = [parse_tests(cell, f"code: column 'tests', row {i}") for i, cell in enumerate(tests)]
        todo = [(i, t) for i, t in enumerate(parsed) if t is not None]
        results = self.verify_many([(extract_code(completion_text(completions[i])), t) for i, t in todo])
        scores: list[float | None] = [None] * n
        info: list[dict[str, Any] | None] = [None] * n
        for (i, _), result in zip(todo, results, strict=True):
            scores[i], info[i] = result.score, result.info()
        return RewardResult(scores, info)


_verifiers: dict[tuple[Any, ...], CodeVerifier] = {}
_verifiers_lock = threading.Lock()


def get_verifier(**options: Any) -> CodeVerifier:
    """A shared `CodeVerifier` per set of options (what the registered reward uses)."""
    key = tuple(sorted(options.items()))
    with _verifiers_lock:
        if key not in _verifiers:
            _verifiers[key] = CodeVerifier(**options)
        return _verifiers[key]


class CodeOptions(StrictModel):
    """Options of the `code` reward (a reward spec's `options`)."""

    time_limit: float = Field(2.0, gt=0)
    """Seconds each test may run."""
    memory_mb: int = Field(512, gt=0)
    """Memory of one program's run, MiB (per process under the process backend)."""
    max_output_bytes: int = Field(1 << 20, gt=0)
    """Stdout an io test may print; more is a failed test."""
    concurrency: int | None = Field(None, ge=1)
    """Programs run at once; None: the cores available. The sandbox is the run's (its `sandbox:` section)."""


@register("code", options=CodeOptions, uses_sandbox=True)
def code_reward(
    prompts: list[Any], completions: list[Any], tests: Sequence[Any] | None = None, **kwargs: Any
) -> RewardResult:
    """Fraction of the row's `tests` the completion's program passes (see the module docstring); the
    options are `CodeOptions`, the other keywords dataset columns (ignored)."""
    options, _ = split_options(CodeOptions, kwargs, "code")
    return get_verifier(**options.model_dump()).score(completions, tests)
