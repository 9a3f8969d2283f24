"""The hostile suite (issue 15) on every sandbox backend: fork, thread and memory bombs, runaway and deaf
processes, daemons, signals at the host, TCP to the host and to a network namespace of the test's own, writes
outside the work dir, host files and the trainer's environment, output and disk floods, file descriptors,
raised limits (the programs and their host-side checks: hostile_programs.py). Zero escapes, checked from the
host after each run; the only escapes allowed are a backend's known gaps by design (the process backend
cannot hide host files or cap a run's memory and disk as a whole), and a backend with any is not strict.

A backend this host cannot run fails here with what is missing (no skips: CI installs every backend with
`rlstack sandbox setup`); select one with `-k process`, `-m docker` or `-m bubblewrap`.
`scripts/hostile_table.py` runs the same suite outside pytest and prints the program x backend table."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hostile_programs import (
    BACKENDS,
    CASES,
    CAUGHT_UNSANDBOXED,
    HostileCase,
    Unsandboxed,
    known_gaps,
    open_backend,
    run_case,
)

from rlstack.envs.backends import backend_class, resolve_backend
from rlstack.envs.config import SandboxConfig
from rlstack.envs.sandbox import Sandbox, SandboxError

MARKS = {"process": [], "docker": [pytest.mark.docker], "bubblewrap": [pytest.mark.bubblewrap]}


@pytest.fixture(scope="module")
def sandboxes() -> Iterator[dict[str, Sandbox | str]]:
    """One sandbox per backend for the whole module (or why this host cannot run it), closed at the end."""
    made: dict[str, Sandbox | str] = {}
    yield made
    for sandbox in made.values():
        if isinstance(sandbox, Sandbox):
            sandbox.close()


def _sandbox(sandboxes: dict[str, Sandbox | str], backend: str) -> Sandbox:
    if backend not in sandboxes:
        sandboxes[backend] = open_backend(backend)
    sandbox = sandboxes[backend]
    if isinstance(sandbox, str):
        pytest.fail(f"{sandbox} (the hostile suite runs on every backend, with no skips)")
    return sandbox


def test_the_suite_has_at_least_16_distinct_programs() -> None:
    names = [case.name for case in CASES]
    assert len(names) >= 16 and len(set(names)) == len(names)


@pytest.mark.parametrize(
    ("backend", "case"),
    [
        pytest.param(backend, case, id=f"{backend}-{case.name}", marks=MARKS[backend])
        for backend in BACKENDS
        for case in CASES
    ],
)
def test_hostile_program_is_contained(
    backend: str, case: HostileCase, sandboxes: dict[str, Sandbox | str]
) -> None:
    sandbox = _sandbox(sandboxes, backend)
    gap = known_gaps(backend, sandbox).get(case.name)
    outcome = run_case(sandbox, backend, case)
    assert not outcome.problems, outcome.report()
    if gap is None:
        assert not outcome.escapes, outcome.report()
    else:  # the gap shows, and nothing else does: else the list of known gaps is out of date
        assert outcome.case_escapes and not outcome.common_escapes, (
            f"known gap of '{backend}': {gap}; expected this case to show it, and only it\n{outcome.report()}"
        )


@pytest.mark.parametrize("backend", [pytest.param(b, marks=MARKS[b]) for b in BACKENDS])
def test_strict_mode_accepts_exactly_the_backends_without_known_gaps(
    backend: str, sandboxes: dict[str, Sandbox | str]
) -> None:
    sandbox = _sandbox(sandboxes, backend)
    gaps = known_gaps(backend, sandbox)
    cls = backend_class(backend)
    assert cls.strict == (not gaps), f"{backend}: strict={cls.strict}, known gaps {gaps}"
    if cls.strict:
        assert resolve_backend(SandboxConfig(backend=backend)) == backend
        return
    with pytest.raises(SandboxError, match="does not contain model code strictly"):
        resolve_backend(SandboxConfig(backend=backend))
    assert resolve_backend(SandboxConfig(backend=backend, strict=False)) == backend
    try:  # auto with strict (the default) never falls back to it
        assert resolve_backend(SandboxConfig()) != backend
    except SandboxError as e:
        assert f"{backend}: not strict" in str(e)


@pytest.mark.parametrize("name", CAUGHT_UNSANDBOXED)
def test_the_checks_catch_the_escape_of_an_unsandboxed_run(name: str) -> None:
    """The control: with no sandbox at all, the host-side checks must see the escape (else they are
    vacuous and "contained" above means nothing)."""
    case = next(case for case in CASES if case.name == name)
    outcome = run_case(Unsandboxed(), "unsandboxed", case)
    assert not outcome.problems and outcome.escapes, outcome.report()
