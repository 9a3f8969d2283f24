"""The `puzzle` reward: does the boxed expression use exactly the given numbers and make the target?

The expression is parsed with `ast` and only integer literals, + - * and parentheses are accepted, so no
code ever runs. Once the literals are checked against the `numbers` column (as a multiset), evaluation is
a handful of integer operations: no time limit is needed. `\\times`, `\\cdot` and `×` count as `*`; a
trailing `=target` is allowed.

    >>> puzzle_reward(["p"] * 3, ["\\\\boxed{(8-3)*4+4}", "\\\\boxed{8*3}", "no box"],
    ...               numbers=[[3, 4, 4, 8]] * 3, target=[24] * 3)
    [1.0, 0.0, 0.0]
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from rlstack.rewards.extract import completion_text, last_boxed
from rlstack.rewards.registry import NoOptions, register

MAX_EXPR_CHARS = 200
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}
_TIMES = re.compile(r"\\times|\\cdot|×")


class _Invalid(Exception):
    """The expression uses something other than integer literals, + - * and parentheses."""


def _literals(node: ast.expr) -> list[int]:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return [node.value]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _literals(node.left) + _literals(node.right)
    raise _Invalid


def _evaluate(node: ast.expr) -> int:
    if isinstance(node, ast.Constant):
        assert type(node.value) is int  # checked by _literals
        return node.value
    assert isinstance(node, ast.BinOp)
    return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))


def check_expression(expr: str, numbers: Sequence[int], target: int) -> bool:
    """True iff `expr` uses each of `numbers` exactly once, only + - * ( ), and equals `target`.

    >>> check_expression("13-(2+1)*3", [1, 2, 3, 13], 4), check_expression("13-2*3", [2, 3, 13, 1], 7)
    (True, False)
    """
    expr = _TIMES.sub("*", expr).replace("\\left", "").replace("\\right", "").strip()
    lhs, eq, rhs = expr.partition("=")
    if eq and rhs.strip() != str(target):
        return False
    lhs = lhs.strip()
    if not lhs or len(lhs) > MAX_EXPR_CHARS or not re.fullmatch(r"[\d+\-*() ]+", lhs):
        return False
    try:
        tree = ast.parse(lhs, mode="eval").body
        used = _literals(tree)
    except (SyntaxError, RecursionError, MemoryError, _Invalid):
        return False
    if Counter(used) != Counter(int(n) for n in numbers):
        return False
    return _evaluate(tree) == int(target)


def _numbers(value: Any) -> list[int] | None:
    """A `numbers` cell: a list of ints, or text like "3 7 8 12" / "3, 7, 8, 12"."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = re.split(r"[,\s]+", value.strip().strip("[]"))
        return [int(p) for p in parts if p]
    return [int(v) for v in value]


@register("puzzle", options=NoOptions)
def puzzle_reward(
    prompts: list[str],
    completions: list[Any],
    numbers: Sequence[Any] | None = None,
    target: Sequence[Any] | None = None,
    **columns: Any,
) -> list[float | None]:
    """1.0 if the last `\\boxed{expr}` uses exactly the row's `numbers` with + - * ( ) and equals its
    `target`, 0.0 otherwise; None for rows (or batches) without numbers or target."""
    n = len(completions)
    if numbers is None or target is None:
        return [None] * n
    out: list[float | None] = []
    for completion, nums, tgt in zip(completions, numbers, target, strict=True):
        given = _numbers(nums)
        if given is None or tgt is None:
            out.append(None)
            continue
        expr = last_boxed(completion_text(completion))
        out.append(float(expr is not None and check_expression(expr, given, int(tgt))))
    return out
