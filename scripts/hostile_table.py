#!/usr/bin/env python3
"""Run the hostile suite (tests/unit/envs/hostile_programs.py) outside pytest on every sandbox backend this
host has, and print the program x backend table in markdown (for the issue note and the README).

    .venv/bin/python scripts/hostile_table.py [--backends process,docker] [--cases fork_bomb,daemon]

A backend this host cannot run gets a column saying why. Exit status 1 when any case escaped where it is
not a known gap by design, could not be judged (set-up failure, sandbox error), or a known gap did not show;
2 when no backend could run at all. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit" / "envs"))

from hostile_programs import BACKENDS, CASES, known_gaps, open_backend, run_case

from rlstack.envs.backends import backend_class
from rlstack.envs.sandbox import Sandbox


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default: all)")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    wanted = {c for c in args.cases.split(",") if c}
    unknown = wanted - {case.name for case in CASES}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {', '.join(case.name for case in CASES)}")
    cases = [case for case in CASES if not wanted or case.name in wanted]

    headers: dict[str, str] = {}
    cells: dict[tuple[str, str], str] = {}
    failures: list[str] = []
    ran = 0
    for backend in backends:
        sandbox = open_backend(backend)
        if isinstance(sandbox, str):
            headers[backend] = f"{backend} (not run: {sandbox})"
            print(f"[{backend}] not run: {sandbox}", file=sys.stderr)
            continue
        ran += 1
        started = time.monotonic()
        try:
            gaps = known_gaps(backend, sandbox)
            for case in cases:
                outcome = run_case(sandbox, backend, case)
                gap = gaps.get(case.name)
                cell = outcome.cell(gap)
                cells[case.name, backend] = cell
                print(f"[{backend}] {case.name}: {cell} ({outcome.seconds:.1f} s)", file=sys.stderr)
                expected = (
                    bool(outcome.case_escapes) and not outcome.common_escapes if gap else not outcome.escapes
                )
                if outcome.problems or not expected:
                    failures.append(f"{backend}/{case.name}: {cell}")
                    print(outcome.report(), file=sys.stderr)
        finally:
            _close(sandbox)
        strict = backend_class(backend).strict
        if strict == bool(gaps):
            failures.append(f"{backend}: strict={strict} but known gaps {sorted(gaps)}")
        mode = "strict" if strict else "not strict: refused unless sandbox.strict: false"
        headers[backend] = f"{backend} ({mode}; {time.monotonic() - started:.0f} s)"

    print("| program | " + " | ".join(_escape(headers[b]) for b in backends) + " |")
    print("|---" * (len(backends) + 1) + "|")
    for case in cases:
        row = [_escape(cells.get((case.name, b), "—")) for b in backends]
        print(f"| {_escape(case.what)} | " + " | ".join(row) + " |")
    if failures:
        print("\nUnexpected:\n" + "\n".join(f"- {_escape(f)}" for f in failures), file=sys.stderr)
        return 1
    return 0 if ran else 2


def _close(sandbox: Sandbox) -> None:
    try:
        sandbox.close()
    except Exception as e:  # the table is still worth printing
        print(f"closing {sandbox.name}: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
