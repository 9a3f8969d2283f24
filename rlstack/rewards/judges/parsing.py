"""Reading verdicts out of free judge text. Each parser returns a value or None ("no verdict found"); none
ever raises on any input, and all are linear-time regexes over at most `MAX_PARSE_CHARS` characters.

The last verdict in the text wins (judges often restate the task's format before answering); explicit
formats are tried before looser phrasings, and the looser ones are anchored on verdict words.

    >>> parse_score("The sum is right. Score: 8/10"), parse_score("[[3]]"), parse_score("no idea")
    (0.8, 0.3, None)
    >>> parse_preference("B drops the carry, so [[A]]"), parse_preference("Answer B is better.")
    ('A', 'B')
    >>> parse_soundness("Step 2 is wrong. [[UNSOUND]]"), parse_soundness("The reasoning is sound.")
    (0.0, 1.0)
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Literal

Preference = Literal["A", "B", "tie"]
MAX_PARSE_CHARS = 4000
"""Only the tail is read: a verdict comes last, and a runaway judge cannot make parsing slow."""

_NUM = r"(\d{1,3}(?:\.\d{1,4})?|\.\d{1,4})"
_SCORE_PATTERNS = [
    # [[7]], [[7/10]], [[0.7]]
    re.compile(rf"\[\[\s*{_NUM}\s*(?:/\s*{_NUM})?\s*\]\]"),
    # Score: 7/10, rating = 4 out of 5, "grade is **9**", score of 0.75
    re.compile(
        rf"\b(?:score|rating|grade|mark|points)\b\s*(?:is|of|[:=])?\s*[*\"'(\[]*\s*{_NUM}"
        rf"(?:\s*(?:/|out\s+of)\s*{_NUM})?",
        re.IGNORECASE,
    ),
    # a bare 7/10 or 7 out of 10
    re.compile(rf"(?<![\d.]){_NUM}\s*(?:/|out\s+of)\s*(10|5|100)\b", re.IGNORECASE),
]
_PROBABILITY = re.compile(
    r"\b(?:probability|confidence|likelihood|p)\s*(?:is|of|[:=])?\s*(0?\.\d+|1\.0*|0|1)(?![\d.])",
    re.IGNORECASE,
)
# "the answer is correct", "Yes, ...": the loosest readings, used only when no number is given.
_POLAR = re.compile(
    r"\b(?:answer|response|solution|result|it|this|that)\s+(?:is|was|seems|looks)\s+"
    r"(not\s+|in)?(correct|right|wrong|accurate)\b",
    re.IGNORECASE,
)
_LEADING_YES_NO = re.compile(r"^\W*(yes|no|correct|incorrect|wrong)\s*(?:[,.!:;]|$)", re.IGNORECASE)
# The format restated ("[[A]] or [[B]]", "[[SOUND]]/[[UNSOUND]]") is not a verdict.
_ECHO = re.compile(r"\[\[\s*\w+\s*\]\]\s*(?:or|/|and|,)\s*\[\[\s*\w+\s*\]\]", re.IGNORECASE)

_PREF_BRACKET = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
# Keywords in any case; the letter itself must be a capital (so the article "a" is never a verdict).
_PREF_LABELLED = re.compile(
    r"\b(?i:verdict|winner|choice|final answer|better (?:answer|response) is|prefer(?:red)?)\s*(?i:is)?"
    r"\s*[:=]?\s*(?i:answer|response|assistant)?\s*[*\"'(\[]*\s*([AB])\b(?!\s*(?:/|and|or))"
)
_PREF_PHRASE = re.compile(
    r"(?:\b(?i:answer|response|assistant|option)\s+([AB])|\[([AB])\])\s+(?i:is|was|seems)\s+"
    r"(?i:(?:indeed|clearly|much|the|a)\s+)*"
    r"(?i:better|preferred|correct|right|more\s+(?:correct|accurate|helpful))\b"
)
_PREF_LAST_LINE = re.compile(r"^\W*([AB])\W*$")
# What the preference patterns above can capture (upper-cased) -> the verdict.
_PREFERENCES: dict[str, Preference] = {"A": "A", "B": "B", "C": "tie", "TIE": "tie"}

_SOUND_BRACKET = re.compile(r"\[\[\s*(SOUND|UNSOUND|YES|NO|VALID|INVALID)\s*\]\]", re.IGNORECASE)
_SOUND_LABELLED = re.compile(r"\b(?:sound|valid)\s*[:=]\s*(yes|no|true|false)\b", re.IGNORECASE)
_SOUND_PHRASE = re.compile(
    r"\b(?:reasoning|rationale|argument|explanation|logic|steps?)\s+(?:is|are|was|were|seems?)\s+"
    r"(not\s+|un|in)?(sound|valid|correct|flawed|wrong|right)\b",
    re.IGNORECASE,
)


def _tail(text: object) -> str:
    if not isinstance(text, str):
        return ""
    return _ECHO.sub(" ", text[-MAX_PARSE_CHARS:])


def _as_fraction(value: str, denominator: str | None, scale: float) -> float | None:
    """A score in [0, 1]: `value / denominator`; a bare value is out of `scale`, or a probability if it is
    written as a decimal <= 1 (`0.8`). Anything out of range is no verdict."""
    try:
        number = float(value)
        if denominator is not None:
            top = float(denominator)
            return number / top if top > 0 and 0 <= number <= top else None
    except ValueError:
        return None
    if "." in value and number <= 1.0:
        return number
    return number / scale if 0 <= number <= scale else None


def parse_score(text: object, scale: float = 10.0) -> float | None:
    """A pointwise verdict in [0, 1] (`Score: 7/10` -> 0.7), or None when the text holds none."""
    tail = _tail(text)
    for pattern in _SCORE_PATTERNS:
        matches = list(pattern.finditer(tail))
        if matches:
            return _as_fraction(matches[-1].group(1), matches[-1].group(2), scale)
    matches = list(_PROBABILITY.finditer(tail))
    if matches:
        return _as_fraction(matches[-1].group(1), "1", 1.0)
    return _polar(tail)


def _polar(tail: str) -> float | None:
    matches = list(_POLAR.finditer(tail))
    if matches:
        negated, word = matches[-1].group(1), matches[-1].group(2).lower()
        positive = word != "wrong"
        return float(positive != bool(negated))
    m = _LEADING_YES_NO.match(tail)
    if m:
        return float(m.group(1).lower() in ("yes", "correct"))
    return None


def parse_preference(text: object, strict: bool = False) -> Preference | None:
    """Which of two answers a pairwise judge prefers: "A", "B", "tie" (`[[C]]`/`[[tie]]`), or None.

    `strict`: only the bracketed form counts, and a text holding two different bracketed choices (a hedge
    like `[[A]][[B]]`) has none; for scoring a policy that is being trained to answer in this format.
    """
    tail = _tail(text)
    matches = list(_PREF_BRACKET.finditer(tail))
    choices = {_PREFERENCES[m.group(1).upper()] for m in matches}
    if strict:
        return choices.pop() if len(choices) == 1 else None
    if matches:
        return _PREFERENCES[matches[-1].group(1).upper()]
    for pattern in (_PREF_LABELLED, _PREF_PHRASE):
        found = list(pattern.finditer(tail))
        if found:
            return _PREFERENCES[next(g for g in found[-1].groups() if g)]
    lines = [line for line in tail.strip().splitlines() if line.strip()]
    if lines:
        m = _PREF_LAST_LINE.match(lines[-1])
        if m:
            return _PREFERENCES[m.group(1)]
    return None


def parse_soundness(text: object) -> float | None:
    """Whether a MetaRM judge finds reasoning sound: 1.0 / 0.0 (or a score in [0, 1]), or None."""
    tail = _tail(text)
    matches = list(_SOUND_BRACKET.finditer(tail))
    if matches:
        return float(matches[-1].group(1).upper() in ("SOUND", "YES", "VALID"))
    matches = list(_SOUND_LABELLED.finditer(tail))
    if matches:
        return float(matches[-1].group(1).lower() in ("yes", "true"))
    score = None
    for pattern in _SCORE_PATTERNS[:2]:
        found = list(pattern.finditer(tail))
        if found:
            score = _as_fraction(found[-1].group(1), found[-1].group(2), 10.0)
            break
    if score is not None:
        return score
    matches = list(_SOUND_PHRASE.finditer(tail))
    if matches:
        negated, word = matches[-1].group(1), matches[-1].group(2).lower()
        positive = word in ("sound", "valid", "correct", "right")
        return float(positive != bool(negated))
    return _polar(tail)


class ParseStats:
    """Judge outputs read and how many held no verdict, per reward (`genrm`, `metarm`) in this process."""

    def __init__(self) -> None:
        self.outputs: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    def record(self, kind: str, ok: bool) -> None:
        self.outputs[kind] += 1
        self.failures[kind] += not ok

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {k: {"outputs": self.outputs[k], "failures": self.failures[k]} for k in sorted(self.outputs)}


STATS = ParseStats()
"""This process's counts (each reward worker has its own; per-sample details travel in RewardResult.info)."""
