"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def trainer_ray() -> Iterator[None]:
    """One local Ray session for a module's in-process `Trainer` runs, started as a `Trainer` starts its own
    (`rlstack.run.init_ray`: the test's import paths reach the actors). A Trainer joins it and leaves it
    running; each run still stops its own actors. Saves a Ray start and stop (about 6 s) per run."""
    import ray

    from rlstack.config import RunConfig
    from rlstack.run import init_ray

    assert not ray.is_initialized(), "a previous test left Ray running"
    init_ray(RunConfig())
    try:
        yield
    finally:
        ray.shutdown()
