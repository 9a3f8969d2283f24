"""Final-answer extraction from a completion: the last `\\boxed{}`, else "answer is X", else the last number.

Pure Python and linear in the text length (no backtracking-prone patterns), safe on any model output.

    >>> extract_answer("so \\\\boxed{\\\\frac{1}{2}} and \\\\boxed{\\\\{1, 2\\\\}}")
    '\\\\{1, 2\\\\}'
    >>> extract_answer("The answer is $-3$.")
    '-3'
    >>> extract_answer("7+8=15, 4+5+1=10")
    '10'
"""

from __future__ import annotations

import re
from typing import Any

_BOX = re.compile(r"\\(?:boxed|fbox)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*", re.IGNORECASE)
_ANSWER_END = re.compile(r"\n|\.\s|\.$|\s+(?:because|since|which|as)\b|;")
_BRACES = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character (e.g. the set brace \{) or a brace
_TOKEN = re.compile(r"[^\s$]+")
# A number not preceded by a digit or a closing bracket (so `12-5` gives 5, not -5).
_NUMBER = re.compile(r"(?<![\d)}\]])-?\d+(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """Contents of the last complete `\\boxed{...}` (nested braces; `\\{ \\}` are literal) or `\\boxed x`.

    One pass over the braces (linear even for thousands of unclosed `\\boxed{` in a degenerate sample).
    """
    boxed_at: dict[int, int] = {}  # index of the `{` opening a boxed group -> index of its `\boxed`
    best: tuple[int, int, int] | None = None  # (start of `\boxed`, content start, content end)
    for m in _BOX.finditer(text):
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            boxed_at[j] = m.start()
        elif j > m.end():  # `\boxed 5`: one space-delimited token
            token = _TOKEN.match(text, j)
            if token:
                best = (m.start(), token.start(), token.end())
    opened: list[int] = []
    for m in _BRACES.finditer(text):
        if m.group() == "{":
            opened.append(m.start())
        elif m.group() == "}" and opened:
            open_at = opened.pop()
            if open_at in boxed_at and (best is None or boxed_at[open_at] > best[0]):
                best = (boxed_at[open_at], open_at + 1, m.start())
    return None if best is None else text[best[1] : best[2]].strip()


def answer_is(text: str) -> str | None:
    """What follows the last "answer is" / "answer:", up to the end of the sentence or line."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :]
    if rest.startswith("$"):
        inline = re.match(r"\$\$?([^$]+)\$", rest)
        if inline:
            return inline.group(1).strip() or None
    end = _ANSWER_END.search(rest)
    value = (rest[: end.start()] if end else rest).strip().strip("$").strip()
    return value or None


def last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def extract_answer(text: str, fallbacks: bool = True) -> str | None:
    """The final answer of a completion; with `fallbacks=False` only a `\\boxed{}` counts. A `\\boxed{` that
    never closes (a truncated answer) is no answer: the fallbacks would pick a number from inside it."""
    found = last_boxed(text)
    if found is not None or not fallbacks or _BOX.search(text):
        return found
    found = answer_is(text)
    return found if found is not None else last_number(text)


def completion_text(completion: Any) -> str:
    """TRL passes completions as strings or, for chat data, as message lists: take the last message's text."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list | tuple) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(
        f"a completion must be a string or a list of chat messages, got {type(completion).__name__}"
    )
