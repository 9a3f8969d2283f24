"""The math verifier: extraction, a table of equivalences, the fast path, time limits on adversarial input."""

from __future__ import annotations

import doctest
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import rlstack.rewards.extract as extract_module
import rlstack.rewards.math_verify as math_module
from rlstack.rewards.extract import answer_is, extract_answer, last_boxed, last_number
from rlstack.rewards.math_verify import MathVerifier, fast_equal, normalize


@pytest.fixture(scope="module")
def verifier() -> Iterator[MathVerifier]:
    # Generous: a loaded CI machine must not turn slow checks into None. The time-limit tests lower it.
    v = MathVerifier(time_limit=10.0)
    v.worker.start()  # imports overlap with the fast tests
    yield v
    v.close()


def box(s: str) -> str:
    return f"so \\boxed{{{s}}}"


# (expected answer, completion, reward). Fast path = both sides plain numbers; the rest go to math-verify.
CASES: list[tuple[str, Any, float]] = [
    # integers, signs, separators
    ("5", box("5"), 1.0),
    ("-7", box("-7"), 1.0),
    ("1000", box("1,000"), 1.0),
    ("5", box("6"), 0.0),
    ("-7", box("7"), 0.0),
    ("1000", box("1001"), 0.0),
    ("3", box("3.5"), 0.0),
    ("505", box("347+158"), 0.0),  # unevaluated arithmetic: copying the question earns nothing
    ("12", box("3 \\times 4"), 0.0),
    ("-1", box("(2-3)"), 0.0),
    # fractions and decimals (decimals match within a relative 1e-6)
    ("1/2", box("\\frac{1}{2}"), 1.0),
    ("0.5", box("\\dfrac{1}{2}"), 1.0),
    ("\\frac{3}{4}", box("0.75"), 1.0),
    ("\\frac{3}{4}", box("3/4"), 1.0),
    ("\\frac{1}{3}", box("0.333333"), 1.0),
    ("\\frac{-1}{2}", box("-\\frac{1}{2}"), 1.0),
    ("7/2", box("3.5"), 1.0),
    ("\\dfrac{12}{8}", box("\\frac{3}{2}"), 1.0),
    ("3.14", box("3.140"), 1.0),
    ("\\frac{1}{3}", box("0.33"), 0.0),
    ("0.5", box("0.51"), 0.0),
    ("1/2", box("2"), 0.0),
    # percent, units, degrees, currency, `x =`
    ("50\\%", box("0.5"), 1.0),
    ("50\\%", box("50"), 1.0),
    ("25%", box("25\\%"), 1.0),
    ("50\\%", box("5"), 0.0),
    ("12 cm", box("12"), 1.0),
    ("12", box("12\\text{ cm}"), 1.0),
    ("12", box("12 \\mathrm{km}"), 1.0),
    ("90^\\circ", box("90"), 1.0),
    ("\\$5", box("5"), 1.0),
    ("x=3", box("3"), 1.0),
    ("3", box("x = 3"), 1.0),
    ("3", box("y=4"), 0.0),
    # symbolic (math-verify / sympy)
    ("\\sqrt{2}", box("2^{1/2}"), 1.0),
    ("\\sqrt{2}", box("\\sqrt{3}"), 0.0),
    ("2\\pi", box("6.283185"), 1.0),
    ("\\frac{\\sqrt{3}}{2}", box("\\frac{1}{2}\\sqrt{3}"), 1.0),
    ("10^{6}", box("1000000"), 1.0),
    ("e^{2}", box("e^2"), 1.0),
    ("x^2+2x+1", box("(x+1)^2"), 1.0),
    ("x^2+2x+1", box("(x-1)^2"), 0.0),
    ("-\\infty", box("-\\infty"), 1.0),
    ("5", box("5x"), 0.0),
    # sets and intervals
    ("\\{1,2\\}", box("\\{2,1\\}"), 1.0),
    ("\\{1,2\\}", box("\\{1,3\\}"), 0.0),
    ("(0,1]", box("(0,1]"), 1.0),
    ("(0,1]", box("[0,1]"), 0.0),
    ("[1,2)", box("[1, 2)"), 1.0),
    ("2, 3", box("3, 2"), 1.0),
    # text answers
    ("(A)", box("(A)"), 1.0),
    ("(A)", box("(B)"), 0.0),
    # extraction: last box, nested, fallbacks, chat messages, none found
    ("2", "\\boxed{1}, no wait: \\boxed{2}", 1.0),
    ("2", "\\boxed{2}, no wait: \\boxed{3}", 0.0),
    ("1/2", "\\boxed{\\boxed{\\frac{1}{2}}}", 1.0),
    ("5", "The answer is 5.", 1.0),
    ("5", "Answer: $5$", 1.0),
    ("3", "The answer is 4.", 0.0),
    ("42", "first 12, then 30, finally 42", 1.0),
    ("0.5", [{"role": "assistant", "content": box("\\frac{1}{2}")}], 1.0),
    ("5", "no number here", 0.0),
    ("5", box(""), 0.0),
    ("12", "so \\boxed{12", 0.0),  # truncated: no answer, and no fallback into the open box
]


def test_table_has_enough_cases() -> None:
    assert len(CASES) >= 50
    assert sum(r == 1.0 for *_, r in CASES) >= 20 and sum(r == 0.0 for *_, r in CASES) >= 20


@pytest.mark.parametrize(("answer", "completion", "reward"), CASES)
def test_equivalence_table(verifier: MathVerifier, answer: str, completion: Any, reward: float) -> None:
    assert verifier.score([completion], [answer]) == [reward]


def test_whole_table_as_one_batch(verifier: MathVerifier) -> None:
    answers, completions, rewards = zip(*CASES, strict=True)
    assert verifier.score(list(completions), list(answers)) == list(rewards)


def test_rows_without_answer_do_not_apply(verifier: MathVerifier) -> None:
    assert verifier.score([box("1"), box("2")], [None, "2"]) == [None, 1.0]
    assert verifier.score([box("1")], None) == [None]
    assert math_module.math_reward(["p"], [box("1")]) == [None]  # no answer column at all
    with pytest.raises(ValueError, match="2 answers for 1 completions"):
        verifier.score([box("1")], ["1", "2"])


def test_extraction() -> None:
    assert last_boxed("\\boxed{\\frac{1}{2}} then \\boxed{\\{1, \\{2\\}\\}}") == "\\{1, \\{2\\}\\}"
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("\\boxed 5$ end") == "5"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{1} and \\boxed{2") == "1"  # the last complete one
    assert last_boxed("no box") is None
    assert answer_is("So the answer is 12 because 5+7=12.") == "12"
    assert answer_is("ANSWER: \\frac{1}{2}\nmore") == "\\frac{1}{2}"
    assert last_number("12-5=7 and x=-3") == "-3"
    assert last_number("12-5=7") == "7"
    assert extract_answer("12-5", fallbacks=False) is None
    assert extract_answer("\\boxed{") is None


def test_extraction_is_linear_on_degenerate_samples() -> None:
    degenerate = [
        "1 " * 50_000 + "answer is " * 1000 + "\\boxed{" * 5000,  # thousands of unclosed boxes
        "\\boxed{" * 20_000 + "}" * 20_000,
        "{" * 100_000 + "\\boxed{7}",
    ]
    start = time.perf_counter()
    results = [extract_answer(text) for text in degenerate]
    assert time.perf_counter() - start < 1.0
    assert results == [None, "", "7"]


def test_normalize_and_fast_path() -> None:
    assert normalize("$x = \\dfrac{1}{2}$.") == "\\frac{1}{2}"
    assert normalize("\\text{12 cm}") == "12 cm"
    assert normalize("\\left( 1, 2 \\right)") == "( 1, 2 )"
    assert fast_equal("12", "12.0000001") is True  # decimals: relative 1e-6
    assert fast_equal("1000000", "1000001") is False  # integers: exact
    assert fast_equal("\\frac{1}{0}", "1") is None  # not a plain number: the worker decides
    assert fast_equal("\\sqrt{2}", "1.414214") is None
    assert fast_equal("5 m", "5") is True and fast_equal("5m", "5") is None  # `5m` may be 5 times m


def test_plain_integers_never_start_the_worker_and_are_fast() -> None:
    v = MathVerifier()
    answers = [str(i) for i in range(5000)]
    completions = [f"7+8=15, 4+5+1=10, so \\boxed{{{i + (i % 3 == 0)}}}" for i in range(5000)]
    start = time.perf_counter()
    scores = v.score(completions, answers)
    elapsed = time.perf_counter() - start
    assert scores == [0.0 if i % 3 == 0 else 1.0 for i in range(5000)]
    assert v.stats.zygote_starts == 0 and v.worker.pid is None
    assert 5000 / elapsed > 2000, f"{5000 / elapsed:.0f} samples/s"


# ---- time limits ----------------------------------------------------------------------------------------

LIMIT = 0.5
NESTED_SQUARES = "x"
for _ in range(12):
    NESTED_SQUARES = f"({NESTED_SQUARES}+1)^{{2}}"  # ((((x+1)^2+1)^2 ...: simplify() expands for seconds
ADVERSARIAL = [
    box("9^{9^{9}}"),  # a big-int power: sympy would compute 9**387420489 inside one C call
    box(NESTED_SQUARES),
    box("9**9**9"),
    box("(" * 3000 + "1" + ")" * 3000),  # deep nesting: parser recursion
    box("\\frac{1}{" * 300 + "2" + "}" * 300),
    box("9" * 5000),  # more digits than int() accepts
]


@pytest.fixture
def strict(verifier: MathVerifier, monkeypatch: pytest.MonkeyPatch) -> MathVerifier:
    """The shared verifier with a short limit (after a timeout the zygote forks a warm worker at once)."""
    monkeypatch.setattr(verifier.worker, "time_limit", LIMIT)
    return verifier


def _timed_score(v: MathVerifier, completion: str) -> tuple[float | None, float]:
    start = time.monotonic()
    out = v.score([completion], ["1"])[0]
    return out, time.monotonic() - start


def test_adversarial_inputs_return_within_the_limit(strict: MathVerifier) -> None:
    strict.score([box("\\sqrt{4}")], ["2"])  # wait for the worker's imports outside the timed calls
    timeouts_before = strict.stats.timeouts
    for completion in ADVERSARIAL:
        out, elapsed = _timed_score(strict, completion)
        print(f"{completion[:30]!r}: {out} in {elapsed:.2f} s")
        assert out in (None, 0.0), completion[:40]
        assert elapsed < LIMIT + 0.5, (completion[:40], elapsed)
        if out is None:  # a timed-out check restarts the worker; wait for it outside the timing
            assert strict.score([box("\\sqrt{4}")], ["2"]) == [1.0]
    assert strict.stats.timeouts >= timeouts_before + 2  # 9^{9^{9}} and the nested squares hit the limit
    assert strict.score([box("\\sqrt{9}")], ["3"]) == [1.0]  # the verifier is healthy afterwards


def test_time_limit_works_off_the_main_thread(strict: MathVerifier) -> None:
    strict.score([box("\\sqrt{4}")], ["2"])
    before = strict.stats.timeouts
    with ThreadPoolExecutor(2) as pool:  # as in a Ray actor: not the main thread, several callers
        slow = pool.submit(_timed_score, strict, box("9^{9^{9}}"))
        ok = pool.submit(strict.score, [box("\\frac{2}{4}"), box("0.5")], ["1/2", "1/2"])
        (out, elapsed), fine = slow.result(timeout=60), ok.result(timeout=60)
    assert threading.current_thread() is threading.main_thread()
    assert out is None and elapsed < 2 * LIMIT + 15  # may queue behind the other call's worker restart
    assert fine == [1.0, 1.0]
    assert strict.stats.timeouts == before + 1


def test_doctests() -> None:
    for module in (extract_module, math_module):
        assert doctest.testmod(module).failed == 0, module.__name__
