"""Sandbox tests: one shared process sandbox; after every test, no sandbox process and no working directory
may be left (checked in the process table and the temp directory)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlstack.envs.process import ProcessSandbox, sandbox_processes


def workdirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("rlstack-sandbox-*")}


@pytest.fixture(scope="session")
def sandbox() -> ProcessSandbox:
    return ProcessSandbox()


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    before = workdirs()
    yield
    assert sandbox_processes() == [], "sandboxed processes outlived their run"
    assert workdirs() - before == set(), "a sandbox working directory was not removed"
