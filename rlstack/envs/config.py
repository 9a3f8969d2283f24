"""The `sandbox:` section of a run (which backend runs model-written code, and how strictly) and the `env:`
section (multi-turn tool environments)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

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


class EnvConfig(StrictModel):
    """The `env:` section: multi-turn episodes with tools. One environment instance per episode, built by
    a registered environment (`name`) or a TRL-style class (`import_path`), see rlstack.envs.environment."""

    name: str | None = None
    """A registered environment (`rlstack envs list`): in-tree (python_tool) or from the `rlstack.envs`
    entry-point group of an installed package."""
    import_path: str | None = None
    """`package.module:Class` of a TRL `environment_factory` class (or any factory of instances)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of every instance's constructor, checked when the config loads."""
    max_turns: int = Field(4, ge=1)
    """Assistant turns per episode; tool calls in the last allowed turn are not run."""
    max_total_tokens: int | None = Field(None, ge=2)
    """Prompt + every turn + tool output, in tokens; None: rollout.max_model_len. Each turn may generate at
    most what is left (and rollout.sampling.max_tokens); tool output that would pass it ends the episode."""
    tool_timeout_s: float = Field(30.0, gt=0)
    """Deadline of one tool call; past it the model reads a time-out error."""
    pool_size: int = Field(16, ge=1)
    """Tool calls run at once per rollout worker (threads), so a slow tool does not stall the others."""

    @model_validator(mode="after")
    def _one_source(self) -> EnvConfig:
        if (self.name is None) == (self.import_path is None):
            raise ValueError("env needs exactly one of `name` (registered) or `import_path` (pkg.mod:Class)")
        return self

    @property
    def label(self) -> str:
        return self.name if self.name is not None else str(self.import_path)
