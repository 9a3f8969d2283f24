"""`code`: write a small Python function from a one-line spec, checked by hidden asserts (the `code` reward).

Prompts are one-line specs of a Python function (under ~110 characters), in 27 families with random
constants; the answer and worked solution are the reference implementation (the solution in a ```python
fence), the hidden `tests` column the asserts the `code` reward runs (their inputs drawn from a generator
seeded by the problem's key, so one problem has one set of tests in every seed and split).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlstack.data.tasks import Problem, TaskGenerator, register_task

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
