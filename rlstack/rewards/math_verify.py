"""The `math` reward: extract the final answer, compare it with the `answer` column, 1.0 / 0.0 / None.

Two paths:
- fast, in-process, pure Python: when both sides are plain numbers (integers, decimals, `a/b`,
  `\\frac{a}{b}`, percents, thousands separators, a unit word) they are compared as exact fractions; a
  decimal on either side matches within a relative 1e-6 (so 0.333333 = 1/3); `50%` matches 50 and 0.5.
  A numeric answer is never matched by unevaluated arithmetic like `347+158`. The demo's integer answers
  never leave this path (over 100,000 samples/s).
- slow, everything else (`\\sqrt{2}`, `\\pi`, sets, intervals, expressions, `x=3`): math-verify (sympy)
  in a time-limited worker process (rlstack.rewards.timelimit). A check that runs past `time_limit`
  (`9^{9^{9}}`, deeply nested input) scores None ("could not be verified") and counts in `stats.timeouts`;
  it never hangs the caller, in any thread.

    >>> math_reward(["2+3?"] * 3, ["so \\\\boxed{5}", "The answer is 6.", "no idea"], answer=["5"] * 3)
    [1.0, 0.0, 0.0]
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from rlstack.rewards.extract import completion_text, extract_answer, last_boxed
from rlstack.rewards.registry import NoOptions, RewardResult, register
from rlstack.rewards.timelimit import Failure, TimeLimitedWorker, WorkerStats

MAX_ANSWER_CHARS = 1000  # longer "answers" are wrong, not worth a sympy parse
REL_TOL = 1e-6

# ---- normalisation and the plain-number fast path -----------------------------------------------------

_UNITS = (
    "cm|mm|km|m|kg|mg|g|lb|lbs|oz|s|sec|secs|second|seconds|min|mins|minute|minutes|h|hr|hrs|hour|hours|"
    "day|days|week|weeks|month|months|year|years|dollar|dollars|cent|cents|unit|units|degree|degrees|"
    "inch|inches|ft|foot|feet|yard|yards|mile|miles|meter|meters|metre|metres|liter|liters|litre|litres|"
    "ml|l|mph|km/h|people|students|items|ways|times|points"
)
_WRAPPERS = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\{([^{}]*)\}")
_DROP = re.compile(r"\\[,;:! ]|\\left|\\right|\\displaystyle|~|\\\$|\$|\^\{?\\circ\}?|°")
_VARIABLE = re.compile(r"^[a-zA-Z]\s*=\s*(?=[^=]+$)")
_PLAIN = re.compile(
    r"(?P<num>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+)"  # 12, -3.5, 1,000, .5
    r"(?:\s*/\s*(?P<den>[-+]?\d+))?"  # 7/2
    rf"\s*(?P<pct>%)?(?:\s+(?:{_UNITS})(?:\^?[23])?)?"  # a unit after a space: `5 m` but not `5m`
)
_LATEX_FRAC = re.compile(
    r"(?P<sign>[-+]?)\\frac\{\s*(?P<num>[-+]?\d+)\s*\}\{\s*(?P<den>[-+]?\d+)\s*\}\s*(?P<pct>%)?"
)

# Integer/decimal literals joined by + - * (e.g. `347+158`): a copy of the question, not a final value.
_OPERAND = r"\(*\s*[-+]?\d+(?:\.\d+)?\s*\)*"
_UNEVALUATED = re.compile(rf"{_OPERAND}(?:\s*(?:[-+*]|\\times|\\cdot)\s*{_OPERAND})+")


def normalize(answer: str) -> str:
    """Strip what never changes a value: $, spacing macros, \\left/\\right, degrees, `\\text{}` wrappers,
    a leading `x =`, a trailing period; `\\dfrac`/`\\tfrac` -> `\\frac`, `\\%` -> `%`."""
    s = answer.strip()
    boxed = last_boxed(s) if s.startswith("\\boxed") else None
    s = boxed if boxed is not None else s
    s = _WRAPPERS.sub(lambda m: f" {m.group(1)} ", s)
    s = _DROP.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%")
    s = _VARIABLE.sub("", " ".join(s.split()))
    return s.rstrip(".").strip()


@dataclass(frozen=True)
class Plain:
    value: Fraction
    decimal: bool  # written with a decimal point: compare within REL_TOL
    percent: bool  # written with %: 50% may mean 50 or 0.5


def parse_plain(s: str) -> Plain | None:
    """A plain number (see the module docstring) or None if `s` is anything else. `s` is normalised."""
    if len(s) > 60:
        return None
    m = _LATEX_FRAC.fullmatch(s)
    if m:
        den = int(m["den"])
        if den == 0:
            return None
        value = Fraction(int(m["num"]), den) * (-1 if m["sign"] == "-" else 1)
        return Plain(value, False, bool(m["pct"]))
    m = _PLAIN.fullmatch(s)
    if not m:
        return None
    num = m["num"].replace(",", "")
    value = Fraction(num)
    if m["den"] is not None:
        if "." in num or int(m["den"]) == 0:
            return None
        value /= int(m["den"])
    return Plain(value, "." in num, bool(m["pct"]))


def _candidates(p: Plain) -> tuple[Fraction, ...]:
    return (p.value, p.value / 100) if p.percent else (p.value,)


def plain_equal(gold: Plain, pred: Plain, rel_tol: float = REL_TOL) -> bool:
    """Exact for integers and fractions; within rel_tol * max(1, |gold|) when either side is a decimal."""
    approx = gold.decimal or pred.decimal
    for g in _candidates(gold):
        for p in _candidates(pred):
            if p == g or (approx and abs(p - g) <= rel_tol * max(Fraction(1), abs(g))):
                return True
    return False


def fast_equal(gold: str, pred: str, rel_tol: float = REL_TOL) -> bool | None:
    """True/False when both normalised answers are plain numbers (or identical text), else None.

    A numeric gold answer is not matched by unevaluated arithmetic (`\\boxed{347+158}` for 505), which
    math-verify would accept: on the arithmetic tasks that would reward copying the question.
    """
    if gold == pred:
        return True
    g, p = parse_plain(gold), parse_plain(pred)
    if g is not None and p is None and _UNEVALUATED.fullmatch(pred):
        return False
    if g is None or p is None:
        return None
    return plain_equal(g, p, rel_tol)


# ---- the slow path, inside the worker process ----------------------------------------------------------


def _worker_warmup() -> None:
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" notices: we time-limit
    slow_equal("\\frac{1}{2}", "0.5")


def slow_equal(gold: str, pred: str) -> bool:
    """math-verify's equivalence (sympy: expressions, sets, intervals, percents, units). No time limit of
    its own (its signal.alarm does not work off the main thread): call it through `TimeLimitedWorker`."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    g = parse(f"${gold}$", extraction_config=config, parsing_timeout=None)
    p = parse(f"${pred}$", extraction_config=config, parsing_timeout=None)
    if not g or not p:  # not maths (e.g. "(B)", "yes"): compare the text
        return " ".join(gold.lower().split()) == " ".join(pred.lower().split())
    return bool(verify(g, p, timeout_seconds=None))


# ---- the verifier and the registered reward -----------------------------------------------------------


class MathVerifier:
    """Scores completions against expected answers. Thread-safe; one worker process, started lazily.

    time_limit: seconds per slow-path check. fallbacks: also accept "answer is X" and a last number when no
    `\\boxed{}` is present. rel_tol: relative tolerance for decimals.
    """

    def __init__(self, time_limit: float = 2.0, fallbacks: bool = True, rel_tol: float = REL_TOL) -> None:
        self.fallbacks, self.rel_tol = fallbacks, rel_tol
        self.worker = TimeLimitedWorker(
            f"{__name__}:slow_equal", time_limit=time_limit, warmup=f"{__name__}:_worker_warmup"
        )
        self.fast = 0
        self.slow = 0

    @property
    def stats(self) -> WorkerStats:
        """Worker counters: calls, timeouts, crashes, errors, zygote starts, forks."""
        return self.worker.stats

    def close(self) -> None:
        self.worker.close()

    def verify(self, gold: str, pred: str) -> bool | None:
        """Are two extracted answers equivalent? None if the check timed out or crashed."""
        return self.verify_many([(gold, pred)])[0]

    def verify_many(self, pairs: Sequence[tuple[str, str]]) -> list[bool | None]:
        out: list[bool | None] = [None] * len(pairs)
        pending: dict[tuple[str, str], list[int]] = {}  # identical pairs are checked once
        for i, (gold, pred) in enumerate(pairs):
            g, p = normalize(gold), normalize(pred)
            if not p or len(p) > MAX_ANSWER_CHARS:
                out[i] = False
                continue
            decided = fast_equal(g, p, self.rel_tol)
            if decided is None:
                pending.setdefault((g, p), []).append(i)
            else:
                out[i] = decided
        self.fast += len(pairs) - sum(len(v) for v in pending.values())
        self.slow += len(pending)
        for pair, result in zip(pending, self.worker.map(list(pending)), strict=True):
            # A timeout or crash cannot say right or wrong: None. An exception while parsing means the
            # prediction is not valid maths: wrong.
            value = None if result in (Failure.TIMEOUT, Failure.CRASH) else result is True
            for i in pending[pair]:
                out[i] = value
        return out

    def score(self, completions: Sequence[Any], answers: Sequence[Any] | None) -> list[float | None]:
        """1.0 right, 0.0 wrong or no answer found, None where a row has no answer or the check timed out."""
        if answers is None:
            return [None] * len(completions)
        if len(answers) != len(completions):
            raise ValueError(f"math: {len(answers)} answers for {len(completions)} completions")
        out: list[float | None] = [None] * len(completions)
        pairs, where = [], []
        for i, (completion, answer) in enumerate(zip(completions, answers, strict=True)):
            if answer is None or str(answer).strip() == "":
                continue
            pred = extract_answer(completion_text(completion), self.fallbacks)
            if pred is None:
                out[i] = 0.0
                continue
            pairs.append((str(answer), pred))
            where.append(i)
        for i, ok in zip(where, self.verify_many(pairs), strict=True):
            out[i] = None if ok is None else float(ok)
        return out


_default: MathVerifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> MathVerifier:
    """The process-wide verifier behind the registered `math` reward (its worker starts on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathVerifier()
        return _default


@register("math", options=NoOptions)
def math_reward(
    prompts: list[str], completions: list[Any], answer: Sequence[Any] | None = None, **columns: Any
) -> list[float | None] | RewardResult:
    """1.0 if the completion's final answer (last `\\boxed{}`, else "answer is X", else the last number)
    equals the `answer` column, 0.0 if not or none is found, None for rows without an answer or when the
    check timed out (counted in `default_verifier().stats.timeouts`, and marked in the sample's info)."""
    scores = default_verifier().score(completions, answer)
    if answer is None:
        return scores
    unverified = {"timeout": "the equivalence check did not finish within the time limit"}
    info = [
        unverified if s is None and a is not None and str(a).strip() else None
        for s, a in zip(scores, answer, strict=True)
    ]
    return RewardResult(scores, info) if any(info) else scores
