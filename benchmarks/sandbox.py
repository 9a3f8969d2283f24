"""Sandbox throughput: calls/s and p50/p99 latency of each sandbox backend on this host (process,
bubblewrap, docker), cold and warm, one call at a time and from several threads at once.

    python benchmarks/sandbox.py                 # rlstack installed, or PYTHONPATH=.
    python benchmarks/sandbox.py --backends docker,process --calls 50 --threads 8
    rlstack sandbox setup                        # (root) to get the docker and bubblewrap backends

Programs: `python3 -c "print(1)"` through `Sandbox.run`, and a small function checked against `--tests`
assert tests (default 20) through `CodeVerifier.verify` (rlstack.rewards.code_verify: one sandbox run of
the test harness). Modes: "cold" builds a new sandbox for every call (docker: `warm_pool=0`, so each call
also starts its own container), its construction and `close()` timed with the call; "warm" reuses one
sandbox (docker: a warm pool of `--warm-pool` containers, refilled in the background), after one untimed
call and, for docker, once the pool is full; "warm xN" is the same with N threads calling at once
(calls/s = calls / wall time of the whole batch). Each row is `--calls` calls; p99 is nearest-rank, so with
fewer than 100 calls it is the slowest call. Notes under the table say how many docker calls found a warm
container. The process backend's one-off isolation probe (cached per Python process, so not part of any
"cold" call) is timed on its own. Every container made is removed, and that is checked at the end.
Numbers depend on the machine and its load; nothing is asserted but that every call gives the right output.

Second table, multi-turn rollout throughput: the tiny policy is taught (a few seconds of PyTorch) a 3-turn
`python_tool` episode (two programs run in the sandbox, then the answer); a `RolloutWorker` (sync vLLM
engine, in this process) then runs `--episodes` episodes of it at once, with the env pool (`--pool`
threads running tool calls) and with one tool session at a time (pool of 1). `--no-multiturn` skips it.
"""

from __future__ import annotations

import argparse
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from functools import partial
from typing import Any

from rlstack.envs.backends import backend_class, host_backends
from rlstack.envs.process import ProcessSandbox
from rlstack.envs.sandbox import Sandbox
from rlstack.rewards.code_verify import CodeVerifier

CODE = "def add(a, b):\n    return a + b\n"


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    backend: str
    program: str
    mode: str
    calls_per_s: float
    p50_ms: float
    p99_ms: float


HEADERS = ("backend", "program", "mode", "calls/s", "p50 ms", "p99 ms")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats with one decimal, columns padded for reading in a terminal."""
    cells = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [
        bool(cells) and all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if num else "-" * (w + 2) for w, num in zip(widths, numeric, strict=True)
    )
    return "\n".join([line(headers), rule + "|", *(line(r) for r in cells)])


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1): an observed value, the largest one for q=0.99 and < 100 values."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def measure(call: Callable[[], None], calls: int, threads: int) -> tuple[float, list[float]]:
    """Run `call` `calls` times, `threads` at a time: (calls per second of wall time, each call's seconds)."""

    def one(_: int) -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    start = time.perf_counter()
    if threads == 1:
        latencies = [one(i) for i in range(calls)]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="bench") as pool:
            latencies = list(pool.map(one, range(calls)))
    return calls / (time.perf_counter() - start), latencies


# -- programs ------------------------------------------------------------------------------------------------


def print_one(sandbox: Sandbox) -> None:
    result = sandbox.run(["python3", "-c", "print(1)"])
    if not (result.succeeded and result.stdout == "1\n"):
        raise RuntimeError(f"{sandbox.name}: print(1) gave {result.describe()}: {result.stderr[-500:]!r}")


def assert_tests(n: int) -> Callable[[Sandbox], None]:
    tests = [f"assert add({i}, {3 * i - 7}) == {4 * i - 7}" for i in range(n)]

    def verify(sandbox: Sandbox) -> None:
        result = CodeVerifier(sandbox=sandbox).verify(CODE, tests)
        if result.passed != n:
            raise RuntimeError(f"{sandbox.name}: {result.passed}/{n} tests passed: {result.error}")

    return verify


# -- sandboxes -----------------------------------------------------------------------------------------------


class Sandboxes:
    """Builds the backends' sandboxes and remembers the docker ones' instances, to check that none of
    their containers outlives the benchmark."""

    def __init__(self) -> None:
        self.docker_instances: set[str] = set()
        self._lock = threading.Lock()

    def make(self, backend: str, warm_pool: int) -> Sandbox:
        """A new sandbox (the class itself: availability was checked once, up front)."""
        if backend != "docker":
            return backend_class(backend)()
        from rlstack.envs.docker import DockerSandbox

        sandbox = DockerSandbox(warm_pool=warm_pool)
        with self._lock:
            self.docker_instances.add(sandbox.instance)
        return sandbox

    def docker_leftovers(self) -> int:
        """Containers (any state) still carrying the label of a docker sandbox made here."""
        if not self.docker_instances:
            return 0
        from rlstack.envs.docker import INSTANCE_LABEL, sandbox_containers

        found = sandbox_containers()  # every container labelled rlstack.sandbox=1
        return sum((c.get("Labels") or {}).get(INSTANCE_LABEL) in self.docker_instances for c in found)


class PoolWatch:
    """Docker's warm pool, seen from outside (its private `_pool`; benchmark only): waits until it is full,
    and counts the runs that found a warm container. A no-op for other backends."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._pool = getattr(sandbox, "_pool", None)
        self._lock = threading.Lock()
        self.hits = self.takes = 0
        if self._pool is not None and hasattr(self._pool, "take"):
            take = self._pool.take

            def counted(key: Any) -> Any:
                container = take(key)
                with self._lock:
                    self.takes += 1
                    self.hits += container is not None
                return container

            self._pool.take = counted

    def reset(self) -> None:
        with self._lock:
            self.hits = self.takes = 0

    def wait_full(self, timeout: float = 30.0) -> None:
        if self._pool is None:
            return
        deadline = time.monotonic() + timeout
        while len(self._pool._ready) < self._pool._size and time.monotonic() < deadline:
            time.sleep(0.05)


# -- the benchmark -------------------------------------------------------------------------------------------


def run_cold(sandboxes: Sandboxes, backend: str, run: Callable[[Sandbox], None]) -> None:
    """One cold call: a new sandbox (docker: no warm pool), `run` on it, then close it."""
    sandbox = sandboxes.make(backend, 0)
    try:
        run(sandbox)
    finally:
        sandbox.close()


def backend_rows(backend: str, args: argparse.Namespace, sandboxes: Sandboxes, notes: list[str]) -> list[Row]:
    """Cold, warm and warm xN rows for each program on one backend."""
    programs: list[tuple[str, Callable[[Sandbox], None]]] = [
        ("print(1)", print_one),
        (f"{args.tests} asserts", assert_tests(args.tests)),
    ]
    rows: list[Row] = []

    def row(program: str, mode: str, rate: float, latencies: list[float]) -> None:
        p50, p99 = percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3
        rows.append(Row(backend, program, mode, rate, p50, p99))
        print(
            f"  {backend:10} {program:10} {mode:9} {rate:7.1f} calls/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms"
        )

    warm = sandboxes.make(backend, args.warm_pool)
    try:
        if isinstance(warm, ProcessSandbox):
            start = time.perf_counter()
            iso = warm.isolation  # probed on first use, then cached per Python process
            notes.append(
                f"process: isolation probe {time.perf_counter() - start:.3f} s, once per Python process "
                f"(namespaces: {'+'.join(iso.namespaces) or 'none'})"
            )
        watch = PoolWatch(warm)
        for program, run in programs:
            row(program, "cold", *measure(partial(run_cold, sandboxes, backend, run), args.calls, 1))
            run(warm)  # untimed: the first run of a program (and docker's first containers)
            for threads in (1, args.threads):
                watch.wait_full()
                watch.reset()
                mode = "warm" if threads == 1 else f"warm x{threads}"
                row(program, mode, *measure(partial(run, warm), args.calls, threads))
                if watch.takes:
                    notes.append(
                        f"docker {mode}, {program}: {watch.hits}/{watch.takes} calls found a warm container "
                        f"(pool of {args.warm_pool})"
                    )
    finally:
        warm.close()
    return rows


EPISODE_HEADERS = (
    "engine",
    "tool sessions at once",
    "episodes",
    "trajectories/s",
    "tool calls",
    "tool s",
    "wall s",
)


def _call(code: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}


EPISODE = (
    "What is 6*7+1?",
    [
        {"role": "assistant", "content": "", "tool_calls": [_call("print(6*7)")]},
        {"role": "tool", "name": "python", "content": "42\n"},
        {"role": "assistant", "content": "", "tool_calls": [_call("print(42+1)")]},
        {"role": "tool", "name": "python", "content": "43\n"},
        {"role": "assistant", "content": "\\boxed{43}"},
    ],
)


def multiturn_rows(args: argparse.Namespace) -> list[tuple[Any, ...]]:
    """Trajectories/s of `args.episodes` 3-turn python_tool episodes: env pool, then one session at a time."""
    import tempfile

    from rlstack.data.prompts import rollout_prompt
    from rlstack.envs.config import EnvConfig, SandboxConfig
    from rlstack.model import init_checkpoint, tiny
    from rlstack.rollout.config import RolloutConfig, SamplingConfig
    from rlstack.rollout.worker import RolloutWorker
    from rlstack.sft import memorize

    rows: list[tuple[Any, ...]] = []
    with tempfile.TemporaryDirectory(prefix="rlstack-bench-") as tmp:
        path = init_checkpoint(tiny(), tmp, seed=0)
        loss = memorize(path, [EPISODE])
        print(f"tool policy taught the 3-turn episode (loss {loss:.1e})")
        sampling = SamplingConfig(n=args.episodes, temperature=1.0, max_tokens=100)
        for pool in (args.pool, 1):
            worker = RolloutWorker(
                path,
                RolloutConfig(max_model_len=512, kv_cache_mb=64, num_threads=2),
                env=EnvConfig(name="python_tool", pool_size=pool),
                sandbox=SandboxConfig(backend=args.episode_backend),
            )
            try:
                prompt = rollout_prompt(worker.tokenizer, {"prompt_id": "p", "prompt": EPISODE[0]}, "p")
                worker.generate([prompt], sampling.model_copy(update={"n": 2}))  # warm-up
                start = time.perf_counter()
                rollouts = worker.generate([prompt], sampling)
                wall = time.perf_counter() - start
            finally:
                worker.shutdown()
            episodes = [r.episode for r in rollouts if r.episode is not None]
            calls = sum(e.tool_calls for e in episodes)
            tool_s = sum(e.tool_seconds for e in episodes)
            rows.append(("sync", pool, len(rollouts), len(rollouts) / wall, calls, tool_s, wall))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backends",
        default="all",
        help="comma-separated, of docker,bubblewrap,process (default: all on this host)",
    )
    parser.add_argument("--calls", type=int, default=20, help="calls per row")
    parser.add_argument("--threads", type=int, default=4, help="threads calling at once, warm xN rows")
    parser.add_argument("--tests", type=int, default=20, help="assert tests of the verified program")
    parser.add_argument(
        "--warm-pool", type=int, default=2, help="docker's warm pool, warm rows (config default 2)"
    )
    parser.add_argument("--episodes", type=int, default=64, help="multi-turn episodes per measurement")
    parser.add_argument("--pool", type=int, default=16, help="env pool threads, multi-turn table")
    parser.add_argument(
        "--episode-backend", default="bubblewrap", help="sandbox of the multi-turn table's python tool"
    )
    parser.add_argument("--no-multiturn", action="store_true", help="skip the multi-turn table")
    args = parser.parse_args()
    if args.calls < 1 or args.threads < 1 or args.tests < 1 or args.warm_pool < 0:
        parser.error("--calls, --threads and --tests must be >= 1, --warm-pool >= 0")

    total_start = time.perf_counter()
    found = host_backends()
    wanted = (
        list(found) if args.backends == "all" else [b.strip() for b in args.backends.split(",") if b.strip()]
    )
    unknown = [b for b in wanted if b not in found]
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)}; built in: {', '.join(found)}")
    notes: list[str] = []
    backends = []
    for name in wanted:
        if found[name]:
            notes.append(f"{name}: skipped, {found[name]}")
        else:
            backends.append(name)
    cpus, load = len(os.sched_getaffinity(0)), os.getloadavg()[0]
    print(f"{cpus} CPUs, load {load:.2f}; {args.calls} calls per row; backends: {', '.join(backends)}")

    sandboxes = Sandboxes()
    rows: list[Row] = []
    try:
        for name in backends:
            rows += backend_rows(name, args, sandboxes, notes)
    finally:
        if sandboxes.docker_instances:
            left = sandboxes.docker_leftovers()
            notes.append(
                f"docker: {len(sandboxes.docker_instances)} sandboxes made, {left} of their containers left"
            )
    episode_rows = [] if args.no_multiturn else multiturn_rows(args)

    print()
    print(markdown_table(HEADERS, [astuple(r) for r in rows]))
    print()
    for note in notes:
        print(f"- {note}")
    if episode_rows:
        print()
        print(markdown_table(EPISODE_HEADERS, episode_rows))
    seconds, load_after = time.perf_counter() - total_start, os.getloadavg()[0]
    print(f"\ntotal {seconds:.0f} s; load average (1 min) {load:.2f} before, {load_after:.2f} after")


if __name__ == "__main__":
    main()
