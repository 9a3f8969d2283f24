"""Math verifier throughput (samples/s), cold and warm, and the cost of its time limit; then the code
verifier's (programs run against their tests in the process sandbox).

    python benchmarks/rewards.py                 # rlstack installed, or PYTHONPATH=.
    python benchmarks/rewards.py --n-fast 20000 --n-slow 500
    python benchmarks/rewards.py --only-code --n-code 64 --code-tests 5

Cases: plain integers and LaTeX fractions take the in-process fast path; fraction sums, radicals and
sets go to math-verify in the time-limited worker process. "cold" is the first batch scored by a new
`MathVerifier` (for worker cases: process start + imports + first parses), "warm" a second batch of
different samples. Then: the time limit's overhead (math-verify in-process vs through the worker, and
a bare socket round trip) and what a timeout costs. Numbers depend on the machine; nothing is asserted.

Code cases: n programs (`add`-style functions, a quarter of them wrong) against k assert tests, or a+b
stdin/stdout programs against k cases. "cold" is a new `CodeVerifier`'s first batch (the first code case
also pays the once-per-process sandbox probe, printed on its own), "warm" a second batch of different
programs. One sandbox process per program; `--code-concurrency` at a time (default: the cores).
"""

from __future__ import annotations

import argparse
import logging
import random
import resource
import time
from collections.abc import Callable

from rlstack.rewards.math_verify import MathVerifier, slow_equal
from rlstack.rewards.timelimit import TimeLimitedWorker

Batch = tuple[list[str], list[str]]  # (completions, answers)


def integers(rng: random.Random, n: int) -> Batch:
    answers = [str(rng.randint(-999, 1999)) for _ in range(n)]
    completions = [f"7+8=15, 4+5+1=10, so \\boxed{{{int(a) + rng.choice((0, 0, 1))}}}" for a in answers]
    return completions, answers


def fractions(rng: random.Random, n: int) -> Batch:
    completions, answers = [], []
    for _ in range(n):
        a, b, k = rng.randint(1, 99), rng.randint(2, 99), rng.randint(1, 5)
        answers.append(f"\\frac{{{a}}}{{{b}}}")
        pred = rng.choice([f"\\frac{{{a * k}}}{{{b * k}}}", f"{a}/{b}", f"\\dfrac{{{a + 1}}}{{{b}}}"])
        completions.append(f"so \\boxed{{{pred}}}")
    return completions, answers


def fraction_sums(rng: random.Random, n: int) -> Batch:
    completions, answers = [], []
    for _ in range(n):
        a, b, c, d = (rng.randint(1, 30) for _ in range(4))
        answers.append(f"\\frac{{{a * d + c * b}}}{{{b * d}}}")
        completions.append(f"so \\boxed{{\\frac{{{a}}}{{{b}}}+\\frac{{{c}}}{{{d}}}}}")
    return completions, answers


def symbolic(rng: random.Random, n: int) -> Batch:
    completions, answers = [], []
    for _ in range(n):
        k, m = rng.randint(2, 50), rng.randint(1, 9)
        gold, pred = rng.choice(
            [
                (f"{m}\\sqrt{{{k}}}", f"\\sqrt{{{m * m * k}}}"),
                (f"{m}\\pi", f"\\pi \\cdot {m}"),
                (f"\\{{{k}, {m}\\}}", f"\\{{{m}, {k}\\}}"),
                (f"({m}, {k}]", f"({m}, {k + 1}]"),
            ]
        )
        answers.append(gold)
        completions.append(f"so \\boxed{{{pred}}}")
    return completions, answers


CASES: list[tuple[str, Callable[[random.Random, int], Batch], str]] = [
    ("integers", integers, "fast"),
    ("LaTeX fractions", fractions, "fast"),
    ("fraction sums", fraction_sums, "worker"),
    ("radicals, pi, sets, intervals", symbolic, "worker"),
]


def rate(v: MathVerifier, batch: Batch) -> float:
    start = time.perf_counter()
    v.score(*batch)
    return len(batch[0]) / (time.perf_counter() - start)


def throughput(n_fast: int, n_slow: int, time_limit: float) -> None:
    print(f"{'case':32} {'path':7} {'n':>6} {'cold /s':>10} {'warm /s':>10}")
    for name, make, path in CASES:
        n = n_fast if path == "fast" else n_slow
        rng = random.Random(0)
        cold_batch, warm_batch = make(rng, n), make(rng, n)
        v = MathVerifier(time_limit=time_limit)
        cold, warm = rate(v, cold_batch), rate(v, warm_batch)
        print(f"{name:32} {path:7} {n:6d} {cold:10.0f} {warm:10.0f}")
        v.close()


def overhead(n: int, time_limit: float) -> None:
    pairs = [
        (a, c.split("boxed{", 1)[1][:-1]) for c, a in zip(*fraction_sums(random.Random(1), n), strict=True)
    ]
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "no timeout" notices: we are timing it
    slow_equal(*pairs[0])  # math-verify's first parse compiles its grammar
    start = time.perf_counter()
    for gold, pred in pairs:
        slow_equal(gold, pred)
    direct = (time.perf_counter() - start) / n
    with TimeLimitedWorker(
        "rlstack.rewards.math_verify:slow_equal",
        time_limit=time_limit,
        warmup="rlstack.rewards.math_verify:_worker_warmup",
    ) as w:
        w.map([pairs[0]])
        start = time.perf_counter()
        w.map(pairs)
        limited = (time.perf_counter() - start) / n
    with TimeLimitedWorker("operator:add", time_limit=time_limit) as w:
        w.map([(0, 0)])
        start = time.perf_counter()
        w.map([(i, i) for i in range(5000)])
        round_trip = (time.perf_counter() - start) / 5000
    print(f"\nmath-verify check, in-process, no limit:   {direct * 1e3:7.2f} ms")
    print(f"same check through the time-limited worker: {limited * 1e3:7.2f} ms")
    print(f"bare socket round trip (operator.add):      {round_trip * 1e6:7.1f} us")


def timeout_cost(time_limit: float) -> None:
    print(f"\ntimeout ({time_limit:g} s limit) on \\boxed{{9^{{9^{{9}}}}}}, then the next check:")
    v = MathVerifier(time_limit=time_limit)
    v.score(["\\boxed{\\sqrt{4}}"], ["2"])  # zygote started, first worker forked
    for _ in range(2):
        start = time.perf_counter()
        out = v.score(["\\boxed{9^{9^{9}}}"], ["1"])
        t_timeout = time.perf_counter() - start
        start = time.perf_counter()
        v.score(["\\boxed{\\sqrt{9}}"], ["3"])  # runs in a worker freshly forked from the zygote
        t_next = time.perf_counter() - start
        print(f"  result {out[0]}, returned after {t_timeout:.3f} s; next check (new worker) {t_next:.3f} s")
    print(f"  {v.stats}")
    v.close()


def add_programs(rng: random.Random, n: int, k: int) -> tuple[list[str], list[list[str]]]:
    completions, tests = [], []
    for _ in range(n):
        c = rng.randint(1, 99)
        body = f"a + b + {c}" if rng.random() < 0.75 else f"a * b + {c}"
        completions.append(f"Here it is:\n```python\ndef f(a, b):\n    return {body}\n```")
        pairs = [(rng.randint(-50, 50), rng.randint(-50, 50)) for _ in range(k)]
        tests.append([f"assert f({a}, {b}) == {a + b + c}" for a, b in pairs])
    return completions, tests


def io_programs(rng: random.Random, n: int, k: int) -> tuple[list[str], list[list[dict[str, str]]]]:
    completions, tests = [], []
    for _ in range(n):
        c = rng.randint(1, 99)
        completions.append(f"```python\na, b = map(int, input().split())\nprint(a + b + {c})\n```")
        pairs = [(rng.randint(-999, 999), rng.randint(-999, 999)) for _ in range(k)]
        tests.append([{"input": f"{a} {b}\n", "output": f"{a + b + c}\n"} for a, b in pairs])
    return completions, tests


def code_throughput(n: int, k: int, concurrency: int | None) -> None:
    from rlstack.envs.process import ProcessSandbox
    from rlstack.rewards.code_verify import CodeVerifier

    start = time.perf_counter()
    iso = ProcessSandbox().isolation
    probe = time.perf_counter() - start
    print(f"\ncode verifier: {n} programs x {k} tests, process sandbox ({'+'.join(iso.namespaces) or 'no'}")
    print(f"namespaces, python {iso.python}); sandbox probe {probe * 1e3:.0f} ms, once per process")
    print(f"{'case':32} {'path':7} {'n':>6} {'cold /s':>10} {'warm /s':>10}")
    for name, make in ((f"functions, {k} asserts", add_programs), (f"stdin/stdout, {k} cases", io_programs)):
        rng = random.Random(0)
        cold_batch, warm_batch = make(rng, n, k), make(rng, n, k)
        verifier = CodeVerifier(time_limit=5.0, concurrency=concurrency)
        rates = []
        for completions, tests in (cold_batch, warm_batch):
            start, cpu = time.perf_counter(), _children_cpu()
            out = verifier.score(completions, tests)
            rates.append(n / (time.perf_counter() - start))
            cpu_ms = (_children_cpu() - cpu) / n * 1e3
            assert all(s is not None for s in out.scores)
        print(
            f"{name:32} {'sandbox':7} {n:6d} {rates[0]:10.1f} {rates[1]:10.1f}   {cpu_ms:.0f} ms CPU/program"
        )


def _children_cpu() -> float:
    """CPU seconds of reaped child processes (the sandboxes): what a program costs, whatever the load."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-fast", type=int, default=20000, help="samples per batch, fast-path cases")
    parser.add_argument("--n-slow", type=int, default=200, help="samples per batch, worker cases")
    parser.add_argument("--time-limit", type=float, default=2.0, help="seconds per worker check")
    parser.add_argument("--n-code", type=int, default=64, help="programs per batch, code verifier")
    parser.add_argument("--code-tests", type=int, default=5, help="tests per program")
    parser.add_argument("--code-concurrency", type=int, default=None, help="programs run at once")
    parser.add_argument("--only-code", action="store_true", help="skip the math verifier")
    args = parser.parse_args()
    if not args.only_code:
        throughput(args.n_fast, args.n_slow, args.time_limit)
        overhead(args.n_slow, args.time_limit)
        timeout_cost(args.time_limit)
    code_throughput(args.n_code, args.code_tests, args.code_concurrency)


if __name__ == "__main__":
    main()
