"""The `sandbox:` section of a run: which backend runs model-written code, and how strictly."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlstack.config_base import StrictModel

BackendName = Literal["auto", "docker", "bubblewrap", "process"]


class SandboxConfig(StrictModel):
    """One sandbox set-up for everything that runs model-written code: the `code` reward's tests and the
    environments' tools. Isolation never degrades silently: `auto` logs the backend it picked, and a host
    that cannot give what is asked fails at start-up, saying what is missing."""

    backend: BackendName = "auto"
    """"auto": the strongest backend this host has (docker, then bubblewrap; the process backend only with
    `strict: false`). A named backend is used or the run refuses to start."""
    strict: bool = True
    """Accept only backends that contain every case of the hostile suite (docker, bubblewrap). The process
    backend cannot hide host files or cap a run's memory as a whole: running model code under it needs
    `strict: false`, an explicit opt-in."""
    image: str | None = None
    """Docker image to run in; None: the one `rlstack sandbox build-image` builds (rlstack.envs.image)."""
    warm_pool: int = Field(2, ge=0)
    """Docker containers kept started and idle, so that a run does not wait for a container start."""
