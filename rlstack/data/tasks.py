"""Built-in generators of verifiable tasks: a deterministic train split and a disjoint held-out split each.

A generator samples `Problem`s from a `random.Random`. Every problem has a canonical `key` (the same problem
written differently, e.g. `158+347` and `347+158`, has the same key); a hash of the key puts the problem in
`heldout` (about 1 in 8) or `train`, so no held-out problem can ever appear in train, whatever the seed.

Texts use only the policy tokenizer's characters and words (`rlstack.model.tokenizer`): prompts stay under
~40 tokens and worked solutions under ~60, ending in `\\boxed{answer}` for the supervised warm start.
The `code` task differs: its prompts are one-line specs of a Python function (under ~110 characters), its
answer and worked solution the reference implementation (the solution in a ```python fence, whose
backticks the policy tokenizer lacks), its hidden `tests` column the asserts the `code` reward runs.

    >>> row = generate_rows("arithmetic", "train", 1, seed=0)[0]
    >>> sorted(row)
    ['answer', 'prompt', 'prompt_id', 'solution', 'task']
    >>> row["solution"].endswith("\\\\boxed{" + row["answer"] + "}")
    True
"""

from __future__ import annotations

import ast
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")


@dataclass(frozen=True)
class Problem:
    key: str
    """Canonical form: two problems are the same iff their keys are equal. Decides the split."""
    prompt: str
    """The user message."""
    answer: str
    """The verifiable final answer (what `\\boxed{}` must contain; for code: the reference implementation)."""
    solution: str
    """A short worked solution ending in `\\boxed{...}` (for puzzle: a format-only demonstration; for code:
    the reference implementation in a ```python fence)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Extra dataset columns passed to reward functions as keyword arguments (e.g. numbers, target)."""


@dataclass(frozen=True)
class TaskGenerator:
    name: str
    sample: Callable[[random.Random], Problem]
    description: str
    heldout_fraction: float = 0.125
    reward: str = "math"
    """The registered reward that checks this task's answers (the default when no config names one)."""


TASKS: dict[str, TaskGenerator] = {}


def register_task(generator: TaskGenerator) -> TaskGenerator:
    if generator.name in TASKS:
        raise ValueError(f"task '{generator.name}' is already registered")
    TASKS[generator.name] = generator
    return generator


def get_task(name: str) -> TaskGenerator:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; built-in tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def split_of(key: str, heldout_fraction: float) -> Split:
    """`heldout` iff the key's hash falls in the first `heldout_fraction` of [0, 1)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "heldout" if bucket < heldout_fraction else "train"


def generate_rows(task: str, split: Split, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` distinct problems of `task` from `split`, the same list for the same arguments.

    Rows: {"prompt_id", "prompt", "answer", "solution", "task", **extra}. `prompt_id` derives from the
    problem's key, so one problem keeps its id across seeds and sizes.
    """
    gen = get_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    rng = random.Random(f"rlstack/{task}/{split}/{seed}")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    budget = 60 * n + 1000  # samples to try before deciding the problem space is exhausted
    while len(rows) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(
                f"task '{task}': found only {len(rows)} distinct {split} problems of {n} requested; "
                "ask for fewer"
            )
        p = gen.sample(rng)
        if p.key in seen or split_of(f"{task}/{p.key}", gen.heldout_fraction) != split:
            continue
        seen.add(p.key)
        digest = hashlib.sha256(f"{task}/{p.key}".encode()).hexdigest()[:12]
        row = {"prompt_id": f"{task}-{digest}", "prompt": p.prompt, "answer": p.answer}
        rows.append({**row, "solution": p.solution, "task": task, **p.extra})
    return rows


# ---- arithmetic: 2-3 digit + and - -------------------------------------------------------------------


def _column_addition(a: int, b: int) -> list[str]:
    """Right-to-left columns with the carry written as a third addend: 47+85 -> 7+5=12, 4+8+1=13."""
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        terms = [d[i] for d in (da, db) if i < len(d)] + (["1"] if carry else [])
        total = sum(int(t) for t in terms)
        steps.append(f"{'+'.join(terms)}={total}")
        carry = total // 10
    return steps


def _column_subtraction(a: int, b: int) -> list[str]:
    """Right-to-left columns, a >= b. A borrow shows as 10 added to the (already decremented) top digit:
    305-158 -> 15-8=7, 9-5=4, 2-1=1."""
    steps, borrow = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(len(da)):
        top = int(da[i]) - borrow
        bottom = int(db[i]) if i < len(db) else 0
        borrow = int(top < bottom)
        top += 10 * borrow
        steps.append(f"{top}-{bottom}={top - bottom}")
    return steps


def _arithmetic(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    if rng.random() < 0.5:
        steps, value, op = _column_addition(a, b), a + b, "+"
        key = f"{min(a, b)}+{max(a, b)}"
    else:
        a, b = max(a, b), min(a, b)  # non-negative results
        steps, value, op = _column_subtraction(a, b), a - b, "-"
        key = f"{a}-{b}"
    solution = ", ".join(steps) + f", so \\boxed{{{value}}}"
    return Problem(key, f"What is {a}{op}{b}?", str(value), solution)


# ---- expression trees (multistep, puzzle) ------------------------------------------------------------

_PREC = {"+": 1, "-": 1, "*": 2}
_APPLY: dict[str, Callable[[int, int], int]] = {
    "+": lambda x, y: x + y,
    "-": lambda x, y: x - y,
    "*": lambda x, y: x * y,
}


@dataclass(frozen=True)
class _Node:
    op: str | None  # None for a leaf
    value: int
    left: _Node | None = None
    right: _Node | None = None


def _join(op: str, left: _Node, right: _Node) -> _Node:
    return _Node(op, _APPLY[op](left.value, right.value), left, right)


def _render(node: _Node) -> str:
    """Infix with the fewest parentheses: a right operand of - (or of * when it is a sum) keeps them."""
    if node.op is None:
        return str(node.value)
    assert node.left is not None and node.right is not None
    left, right = _render(node.left), _render(node.right)
    if node.left.op is not None and _PREC[node.left.op] < _PREC[node.op]:
        left = f"({left})"
    if node.right.op is not None and (
        _PREC[node.right.op] < _PREC[node.op] or (_PREC[node.right.op] == _PREC[node.op] and node.op == "-")
    ):
        right = f"({right})"
    return f"{left}{node.op}{right}"


def _steps(node: _Node) -> list[str]:
    """One `x op y=z` per operation, innermost first, left before right."""
    if node.op is None:
        return []
    assert node.left is not None and node.right is not None
    own = f"{node.left.value}{node.op}{node.right.value}={node.value}"
    return [*_steps(node.left), *_steps(node.right), own]


def _parse(expr: str) -> _Node:
    """The tree of an infix expression as written (left-associative), so worked steps follow the text."""
    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}

    def build(n: ast.expr) -> _Node:
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return _Node(None, n.value)
        assert isinstance(n, ast.BinOp) and type(n.op) in ops, ast.dump(n)
        return _join(ops[type(n.op)], build(n.left), build(n.right))

    return build(ast.parse(expr, mode="eval").body)


def _values(node: _Node) -> list[int]:
    if node.op is None:
        return [node.value]
    assert node.left is not None and node.right is not None
    return [*_values(node.left), *_values(node.right), node.value]


def _random_tree(rng: random.Random, leaves: list[int], ops: str) -> _Node:
    """A random binary tree over `leaves` in the given order, operators drawn from `ops`."""
    if len(leaves) == 1:
        return _Node(None, leaves[0])
    cut = rng.randint(1, len(leaves) - 1)
    left, right = _random_tree(rng, leaves[:cut], ops), _random_tree(rng, leaves[cut:], ops)
    return _join(rng.choice(ops), left, right)


def _multistep(rng: random.Random) -> Problem:
    while True:
        leaves = [rng.randint(1, 20) for _ in range(rng.randint(3, 4))]
        # Re-parsed from its text: `a*b*c` is computed left to right whichever tree produced it.
        tree = _parse(_render(_random_tree(rng, leaves, "+-*")))
        # Non-negative, bounded intermediates keep every step a plain `x op y=z` a tiny model can copy.
        if all(0 <= v <= 999 for v in _values(tree)):
            break
    expr = _render(tree)
    solution = ", ".join(_steps(tree)) + f", so \\boxed{{{tree.value}}}"
    return Problem(expr, f"Compute {expr}.", str(tree.value), solution)


# ---- linear equations ---------------------------------------------------------------------------------


def _linear(rng: random.Random) -> Problem:
    a, b, x = rng.randint(2, 12), rng.randint(1, 50), rng.randint(-20, 20)
    v = rng.choice("xyzn")
    form = rng.randrange(5)
    if form == 0:  # a*x+b=c
        c = a * x + b
        eq, steps = f"{a}*{v}+{b}={c}", [f"{a}*{v}={c}-{b}={c - b}", f"{v}={c - b}/{a}={x}"]
    elif form == 1:  # a*x-b=c
        c = a * x - b
        eq, steps = f"{a}*{v}-{b}={c}", [f"{a}*{v}={c}+{b}={c + b}", f"{v}={c + b}/{a}={x}"]
    elif form == 2:  # b+a*x=c
        c = b + a * x
        eq, steps = f"{b}+{a}*{v}={c}", [f"{a}*{v}={c}-{b}={c - b}", f"{v}={c - b}/{a}={x}"]
    elif form == 3:  # a*(x+b)=c
        c = a * (x + b)
        eq, steps = f"{a}*({v}+{b})={c}", [f"{v}+{b}={c}/{a}={x + b}", f"{v}={x + b}-{b}={x}"]
    else:  # a*(x-b)=c
        c = a * (x - b)
        eq, steps = f"{a}*({v}-{b})={c}", [f"{v}-{b}={c}/{a}={x - b}", f"{v}={x - b}+{b}={x}"]
    solution = ", ".join(steps) + f", so \\boxed{{{x}}}"
    # The letter and the order of b+a*x do not make a different problem.
    key = f"{a}*x+{b}={c}" if form == 2 else eq.replace(v, "x")
    return Problem(key, f"Solve {eq} for {v}.", str(x), solution)


# ---- target-number puzzle -----------------------------------------------------------------------------


PUZZLE_SIZES = (2, 3, 4)
"""How many numbers a puzzle gives, drawn uniformly: a mix of easy and hard, so that a policy that only
knows the answer format succeeds sometimes (about 1 in 4 two-number puzzles by guessing) and RL has
a signal to start from."""


def _puzzle(rng: random.Random) -> Problem:
    """2-4 numbers 1-13 and a target 1-200 reached by a random expression using each once (so one exists)."""
    size = rng.choice(PUZZLE_SIZES)
    while True:
        numbers = [rng.randint(1, 13) for _ in range(size)]
        order = rng.sample(numbers, len(numbers))
        tree = _random_tree(rng, order, "+-*")
        if 1 <= tree.value <= 200:
            break
    # No worked solutions exist for RL here: the demonstration only shows the format, an expression over
    # the numbers (each once) in \boxed{}, built independently of the target, so usually wrong.
    demo = _random_tree(rng, rng.sample(numbers, len(numbers)), "+-*")
    key = f"{' '.join(map(str, sorted(numbers)))} -> {tree.value}"
    prompt = f"Use the numbers {', '.join(map(str, numbers))} each once to make {tree.value}."
    extra = {"numbers": numbers, "target": tree.value, "reference": _render(tree)}
    return Problem(key, prompt, str(tree.value), f"\\boxed{{{_render(demo)}}}", extra)


register_task(TaskGenerator("arithmetic", _arithmetic, "2-3 digit addition and subtraction, column-wise"))
register_task(TaskGenerator("multistep", _multistep, "expressions with 2-3 operations, e.g. (12+7)*3-5"))
register_task(TaskGenerator("linear", _linear, "linear equations with an integer solution, e.g. 3*x+7=22"))
register_task(
    TaskGenerator(
        "puzzle", _puzzle, "make the target from 2-4 numbers with + - * and parentheses", reward="puzzle"
    )
)


# ---- preference: which of two answers is right (training a GenRM) -------------------------------------


def _near_miss(rng: random.Random, value: int) -> int:
    """A plausible wrong result: off by 1, 10 or 100 (a slipped digit, a dropped or an extra carry)."""
    while True:
        wrong = value + rng.choice((-100, -10, -1, 1, 10, 100))
        if wrong >= 0:
            return wrong


def _preference(rng: random.Random) -> Problem:
    """An arithmetic question with its result and a near miss as answers A and B (in random order). The
    answer is the gold label; the worked solution checks the columns, then names the right one as [[A]] or
    [[B]]. The key is the arithmetic question alone, so a held-out question never reaches training with
    any pair of candidates."""
    base = _arithmetic(rng)
    value = int(base.answer)
    wrong = _near_miss(rng, value)
    label = rng.choice("AB")
    first, second = (value, wrong) if label == "A" else (wrong, value)
    question = base.prompt.removeprefix("What is ").removesuffix("?")
    steps = base.solution.rpartition(", so ")[0]
    prompt = f"Which is right for {question}? A: {first} B: {second}"
    extra = {"candidates": [first, second]}
    return Problem(base.key, prompt, label, f"{steps}, so {value}: [[{label}]]", extra)


register_task(
    TaskGenerator(
        "preference",
        _preference,
        "pick the right one of two answers to an arithmetic question",
        reward="preference",
    )
)


# ---- code: small Python functions with hidden tests --------------------------------------------------

CODE_TESTS = 8
"""Hidden assert statements per `code` problem."""


@dataclass(frozen=True)
class _CodeSpec:
    """One function to write: `def {signature}:` returning `returns` (the spec), `body` the reference."""

    key: str
    signature: str
    returns: str
    body: str
    draw: Callable[[random.Random, int], tuple[Any, ...]]
    """The arguments of draw `i` (even and odd draws may differ, e.g. a multiple and a non-multiple)."""


def _signed(c: int) -> str:
    """`+5`, `-5`, or nothing for 0: the tail of `x*3+5`."""
    return f"{c:+d}" if c else ""


def _int_list(
    rng: random.Random, lo: int = -20, hi: int = 50, min_len: int = 0, with_: int | None = None
) -> list[int]:
    """0-8 integers in [lo, hi] (at least `min_len`), and `with_` at a random place unless None."""
    xs = [rng.randint(lo, hi) for _ in range(rng.randint(min_len, 8))]
    if with_ is not None:
        xs.insert(rng.randint(0, len(xs)), with_)
    return xs


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random, hi: int = 10, bias: str = "", p: float = 0.0, with_: str = "") -> str:
    """0-`hi` lowercase letters, each one of `bias` with probability `p`, and `with_` at a random place."""
    letters = [
        rng.choice(bias) if rng.random() < p else rng.choice(_LETTERS) for _ in range(rng.randint(0, hi))
    ]
    letters.insert(rng.randint(0, len(letters)), with_)
    return "".join(letters)


def _code_affine(rng: random.Random) -> _CodeSpec:
    k, c = rng.randint(2, 20), rng.randint(-99, 99)
    expr = f"x*{k}{_signed(c)}"
    return _CodeSpec(f"affine {k} {c}", "f(x)", expr, f"return {expr}", lambda r, i: (r.randint(-100, 100),))


def _code_quadratic(rng: random.Random) -> _CodeSpec:
    a, b = rng.choice([-1, 1]) * rng.randint(1, 12), rng.randint(-50, 50)
    expr = f"x*x{_signed(a)}*x{_signed(b)}"
    return _CodeSpec(f"quadratic {a} {b}", "f(x)", expr, f"return {expr}", lambda r, i: (r.randint(-30, 30),))


def _code_divisible(rng: random.Random) -> _CodeSpec:
    k = rng.randint(2, 99)
    return _CodeSpec(
        f"divisible {k}",
        "f(n)",
        f"True if n is divisible by {k}, else False",
        f"return n % {k} == 0",
        lambda r, i: (k * r.randint(-20, 20) + (0 if i % 2 == 0 else r.randint(1, k - 1)),),
    )


def _code_remainder(rng: random.Random) -> _CodeSpec:
    k = rng.randint(2, 99)
    return _CodeSpec(
        f"remainder {k}",
        "f(n)",
        f"the remainder of n divided by {k}, for n >= 0",
        f"return n % {k}",
        lambda r, i: (k * r.randint(0, 1000 // k) + i % k,),
    )


def _code_digit_sum(rng: random.Random) -> _CodeSpec:
    return _CodeSpec(
        "digit sum",
        "f(n)",
        "the sum of the digits of n, for n >= 0",
        "return sum(int(d) for d in str(n))",
        lambda r, i: (r.randint(0, 10 ** r.randint(1, 7)),),
    )


def _code_count_digit(rng: random.Random) -> _CodeSpec:
    d = rng.randint(0, 9)
    return _CodeSpec(
        f"count digit {d}",
        "f(n)",
        f"how many times the digit {d} appears in n, for n >= 0",
        f"return str(n).count('{d}')",
        lambda r, i: (int(_word(r, 7, "0123456789", 1.0, with_=str(d) if i % 2 == 0 else "") or "0"),),
    )


def _code_range_sum(rng: random.Random) -> _CodeSpec:
    a = rng.randint(-20, 30)
    return _CodeSpec(
        f"range sum {a}",
        "f(n)",
        f"the sum of the integers from {a} to n inclusive (0 if n < {a})",
        f"return sum(range({a}, n + 1))",
        lambda r, i: (r.randint(a - 3, a + 40),),
    )


def _code_clamp(rng: random.Random) -> _CodeSpec:
    a = rng.randint(-99, 99)
    b = a + rng.randint(1, 60)
    return _CodeSpec(
        f"clamp {a} {b}",
        "f(x)",
        f"x clamped to the range [{a}, {b}]",
        f"return min(max(x, {a}), {b})",
        lambda r, i: (
            r.randint(a - 30, a - 1)
            if i % 3 == 0
            else r.randint(a, b)
            if i % 3 == 1
            else r.randint(b + 1, b + 30),
        ),
    )


def _code_weighted(rng: random.Random) -> _CodeSpec:
    k, c = rng.randint(2, 12), rng.choice([-1, 1]) * rng.randint(1, 12)
    expr = f"a*{k}{'+' if c > 0 else '-'}b*{abs(c)}"
    return _CodeSpec(
        f"weighted {k} {c}",
        "f(a, b)",
        expr,
        f"return {expr}",
        lambda r, i: (r.randint(-50, 50), r.randint(-50, 50)),
    )


def _code_larger(rng: random.Random) -> _CodeSpec:
    k = rng.choice([-1, 1]) * rng.randint(1, 50)
    return _CodeSpec(
        f"larger {k}",
        "f(a, b)",
        f"the larger of a and b {'plus' if k > 0 else 'minus'} {abs(k)}",
        f"return max(a, b){_signed(k)}",
        lambda r, i: (r.randint(-50, 50), r.randint(-50, 50)),
    )


def _code_threshold(rng: random.Random) -> _CodeSpec:
    t, a, b = rng.randint(-50, 50), rng.randint(-20, 20), rng.randint(-20, 20)
    while b == a:
        b = rng.randint(-20, 20)
    return _CodeSpec(
        f"threshold {t} {a} {b}",
        "f(x)",
        f"{a} if x > {t}, else {b}",
        f"return {a} if x > {t} else {b}",
        lambda r, i: (t + r.randint(1, 30) if i % 2 == 0 else t - r.randint(0, 30),),
    )


def _code_reversed_list(rng: random.Random) -> _CodeSpec:
    return _CodeSpec(
        "list reversed", "f(xs)", "the list xs reversed", "return xs[::-1]", lambda r, i: (_int_list(r),)
    )


def _code_first(rng: random.Random) -> _CodeSpec:
    k = rng.randint(1, 9)
    return _CodeSpec(
        f"first {k}",
        "f(xs)",
        f"a list of the first {k} elements of xs",
        f"return xs[:{k}]",
        lambda r, i: (_int_list(r),),
    )


def _code_filter_greater(rng: random.Random) -> _CodeSpec:
    k = rng.randint(-50, 50)
    return _CodeSpec(
        f"filter greater {k}",
        "f(xs)",
        f"a list of the elements of xs greater than {k}, in order",
        f"return [x for x in xs if x > {k}]",
        lambda r, i: (_int_list(r, k - 30, k + 30, with_=k + r.randint(1, 9) if i % 2 == 0 else None),),
    )


def _code_sum_greater(rng: random.Random) -> _CodeSpec:
    k = rng.randint(-50, 50)
    return _CodeSpec(
        f"sum greater {k}",
        "f(xs)",
        f"the sum of the elements of xs greater than {k}",
        f"return sum(x for x in xs if x > {k})",
        lambda r, i: (_int_list(r, k - 30, k + 30, with_=k + r.randint(1, 9) if i % 2 == 0 else None),),
    )


def _code_count_equal(rng: random.Random) -> _CodeSpec:
    k = rng.randint(0, 50)
    return _CodeSpec(
        f"count equal {k}",
        "f(xs)",
        f"how many elements of xs are equal to {k}",
        f"return xs.count({k})",
        lambda r, i: (_int_list(r, k - 10, k + 10, with_=k if i % 2 == 0 else None),),
    )


def _code_count_between(rng: random.Random) -> _CodeSpec:
    a = rng.randint(-20, 30)
    b = a + rng.randint(0, 30)
    return _CodeSpec(
        f"count between {a} {b}",
        "f(xs)",
        f"how many elements of xs are between {a} and {b} inclusive",
        f"return sum({a} <= x <= {b} for x in xs)",
        lambda r, i: (
            _int_list(r, a - 15, b + 15, with_=r.randint(a, b))
            if i % 2 == 0
            else [
                r.choice((r.randint(a - 15, a - 1), r.randint(b + 1, b + 15))) for _ in range(r.randint(0, 8))
            ],
        ),
    )


def _code_spread(rng: random.Random) -> _CodeSpec:
    return _CodeSpec(
        "spread",
        "f(xs)",
        "the largest element of xs minus the smallest (xs is not empty)",
        "return max(xs) - min(xs)",
        lambda r, i: (_int_list(r, min_len=1),),
    )


def _code_map_affine(rng: random.Random) -> _CodeSpec:
    k, c = rng.randint(2, 12), rng.randint(-50, 50)
    expr = f"x*{k}{_signed(c)}"
    return _CodeSpec(
        f"map affine {k} {c}",
        "f(xs)",
        f"a list of {expr} for each x in xs",
        f"return [{expr} for x in xs]",
        lambda r, i: (_int_list(r),),
    )


def _code_multiples(rng: random.Random) -> _CodeSpec:
    k = rng.randint(2, 12)
    return _CodeSpec(
        f"multiples {k}",
        "f(xs)",
        f"a list of the elements of xs divisible by {k}, in order",
        f"return [x for x in xs if x % {k} == 0]",
        lambda r, i: (_int_list(r, with_=k * r.randint(-3, 5) if i % 2 == 0 else None),),
    )


def _code_vowels(rng: random.Random) -> _CodeSpec:
    return _CodeSpec(
        "vowels",
        "f(s)",
        "the number of vowels (a, e, i, o, u) in the lowercase string s",
        "return sum(c in 'aeiou' for c in s)",
        lambda r, i: (_word(r),),
    )


def _code_count_letter(rng: random.Random) -> _CodeSpec:
    c = rng.choice("abcdefghijklmnopqrstuvwxyz")
    return _CodeSpec(
        f"count letter {c}",
        "f(s)",
        f"how many times the letter '{c}' appears in s",
        f"return s.count('{c}')",
        lambda r, i: (_word(r, bias=c, p=0.2, with_=c if i % 2 == 0 else ""),),
    )


def _code_repeat(rng: random.Random) -> _CodeSpec:
    k, sep = rng.randint(2, 9), rng.choice(["", "-", ",", ";", ":", "|", "+", "."])
    if sep:
        returns, body = f"{k} copies of s joined by '{sep}'", f"return '{sep}'.join([s] * {k})"
    else:
        returns, body = f"s repeated {k} times", f"return s * {k}"
    return _CodeSpec(f"repeat {k} '{sep}'", "f(s)", returns, body, lambda r, i: (_word(r, hi=5),))


def _code_replace(rng: random.Random) -> _CodeSpec:
    a, b = rng.sample("abcdefghijklmnopqrstuvwxyz", 2)
    return _CodeSpec(
        f"replace {a} {b}",
        "f(s)",
        f"s with every '{a}' replaced by '{b}'",
        f"return s.replace('{a}', '{b}')",
        lambda r, i: (_word(r, bias=a + b, p=0.3, with_=a if i % 2 == 0 else ""),),
    )


def _code_prefix(rng: random.Random) -> _CodeSpec:
    p = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=2))
    return _CodeSpec(
        f"prefix {p}",
        "f(s)",
        f"True if s starts with '{p}', else False",
        f"return s.startswith('{p}')",
        lambda r, i: ((p if i % 2 == 0 else "") + _word(r, bias=p, p=0.2),),
    )


def _code_drop(rng: random.Random) -> _CodeSpec:
    k = rng.randint(1, 9)
    return _CodeSpec(
        f"drop {k}",
        "f(s)",
        f"s without its first {k} characters",
        f"return s[{k}:]",
        lambda r, i: ("".join(r.choices(_LETTERS, k=r.randint(k + 1 if i % 2 == 0 else 0, k + 6))),),
    )


def _code_reversed_string(rng: random.Random) -> _CodeSpec:
    return _CodeSpec(
        "string reversed", "f(s)", "the string s reversed", "return s[::-1]", lambda r, i: (_word(r),)
    )


CODE_TEMPLATES: tuple[tuple[Callable[[random.Random], _CodeSpec], int], ...] = (
    # Families with many variants weigh more: a split of 10,000 problems (the default train size) must not
    # spend most of its draws repeating the few problems of a small family.
    (_code_affine, 4),
    (_code_quadratic, 4),
    (_code_clamp, 4),
    (_code_threshold, 4),
    (_code_map_affine, 3),
    (_code_count_between, 3),
    (_code_weighted, 2),
    (_code_replace, 2),
    (_code_prefix, 2),
    (_code_divisible, 1),
    (_code_remainder, 1),
    (_code_digit_sum, 1),
    (_code_count_digit, 1),
    (_code_range_sum, 1),
    (_code_larger, 1),
    (_code_reversed_list, 1),
    (_code_first, 1),
    (_code_filter_greater, 1),
    (_code_sum_greater, 1),
    (_code_count_equal, 1),
    (_code_spread, 1),
    (_code_multiples, 1),
    (_code_vowels, 1),
    (_code_count_letter, 1),
    (_code_repeat, 1),
    (_code_drop, 1),
    (_code_reversed_string, 1),
)
"""The `code` task's families and their weights; their constants make about 190,000 distinct problems."""


_CODE_FAMILIES, _CODE_WEIGHTS = zip(*CODE_TEMPLATES, strict=True)


def _code(rng: random.Random) -> Problem:
    """A function to write, its reference implementation (the answer; fenced, the worked solution), and
    CODE_TESTS hidden asserts on distinct inputs. The inputs come from a generator seeded by the key, so one
    problem has the same tests whichever seed or split drew it."""
    spec = rng.choices(_CODE_FAMILIES, _CODE_WEIGHTS)[0](rng)
    source = f"def {spec.signature}:\n    {spec.body}\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, "<reference>", "exec"), namespace)  # our own template code: the expected outputs
    reference = namespace["f"]
    inputs = random.Random(f"rlstack/code/{spec.key}")
    cases: dict[str, Any] = {}
    for attempt in range(200):
        if len(cases) == CODE_TESTS:
            break
        args = spec.draw(inputs, attempt)
        call = f"f({', '.join(map(repr, args))})"
        if call not in cases:
            cases[call] = reference(*args)
    # Tests that one constant would pass teach nothing: every template draws inputs with differing results.
    assert len({repr(v) for v in cases.values()}) > 1, spec.key
    tests = [f"assert {call} == {value!r}" for call, value in cases.items()]
    prompt = f"Write a Python function {spec.signature} that returns {spec.returns}."
    return Problem(spec.key, prompt, source, f"```python\n{source}```", {"tests": tests})


register_task(
    TaskGenerator(
        "code",
        _code,
        "write a small Python function from a one-line spec, checked by hidden asserts",
        reward="code",
    )
)
