"""Built-in generators of verifiable tasks: a deterministic train split and a disjoint held-out split each.

A generator samples `Problem`s from a `random.Random`. Every problem has a canonical `key` (the same problem
written differently, e.g. `158+347` and `347+158`, has the same key); a hash of the key puts the problem in
`heldout` (about 1 in 8) or `train`, so no held-out problem can ever appear in train, whatever the seed.

Texts use only the policy tokenizer's characters and words (`rlstack.model.tokenizer`): prompts stay under
~40 tokens and worked solutions under ~60, ending in `\\boxed{answer}` for the supervised warm start.
Tasks of their own modules: `code` (rlstack.data.code_tasks) and `python_tool` (rlstack.data.tool_tasks).

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


def _addition(rng: random.Random) -> Problem:
    """Two-digit addition, the answer asked for in \\boxed{}: a task an instruction-tuned small model
    (SmolLM2-135M-Instruct) solves sometimes, not reliably (configs/smollm2.yaml)."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    prompt = f"What is {a}+{b}? Put the final answer in \\boxed{{}}."
    return Problem(f"{min(a, b)}+{max(a, b)}", prompt, str(a + b), f"{a}+{b}={a + b}, so \\boxed{{{a + b}}}")


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
register_task(TaskGenerator("addition", _addition, "2-digit addition, answer asked for in \\boxed{}"))
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
