"""Reward config: which plugins score a rollout and with what weight; where the reward workers run."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from rlstack.config_base import StrictModel


class RewardSpec(StrictModel):
    """One reward plugin, by registered name or by import path, and its weight in the sum."""

    name: str | None = None
    """A registered reward (`rlstack rewards list`): in-tree (math, puzzle) or from the `rlstack.rewards`
    entry-point group of an installed package."""
    import_path: str | None = None
    """`package.module:function` of a TRL-style reward function, imported by each reward worker."""
    weight: float = 1.0
    """Multiplies this reward in the weighted sum over the rewards that apply to a sample."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments bound to the plugin on every call (e.g. `{mode: pairwise}` for genrm); a dataset
    column of the same name overrides them. With `factory: true`, the arguments of the factory instead.
    Checked when the config loads, against the plugin's options model or else its signature."""
    factory: bool = False
    """`import_path` (or `name`) is a factory: it is called once per scoring process with `options` as
    keyword arguments and returns the reward function, e.g. TRL's
    `{import_path: "trl.rewards:get_soft_overlong_punishment", factory: true,
    options: {max_completion_len: 512, soft_punish_cache: 128}}`."""

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        if (self.name is None) == (self.import_path is None):
            raise ValueError(
                "a reward needs exactly one of `name` (registered) or `import_path` (pkg.mod:fn)"
            )
        if self.import_path is not None and ":" not in self.import_path:
            raise ValueError(f"import_path '{self.import_path}' must look like package.module:function")
        return self

    @property
    def label(self) -> str:
        """How metrics and errors name this reward."""
        return self.name if self.name is not None else str(self.import_path)


class RewardWorkersConfig(StrictModel):
    """Where and how rewards are computed: Ray reward workers, time limits, caching."""

    num_workers: int = Field(1, ge=0)
    """Reward worker actors scoring chunks concurrently; 0 scores in the driver process."""
    cpus_per_worker: float = Field(0.0, ge=0.0)
    """Ray CPUs reserved per worker. 0 (the default) lets workers share the cores the rollout and learner
    actors reserve: scoring runs between generation and training, not beside them."""
    ray_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each reward worker needs (places them on the nodes that have them)."""
    chunk_size: int = Field(64, ge=1)
    """Samples per plugin call: whole prompt groups are added until the next would pass this size."""
    time_limit_s: float = Field(60.0, gt=0.0)
    """Deadline of one plugin call on a chunk, and of each per-sample call when the chunk call fails."""
    max_abandoned_threads: int = Field(4, ge=0)
    """A worker with more timed-out calls than this still running is replaced by a fresh actor."""
    cache_size: int = Field(100_000, ge=0)
    """Scores kept per worker (LRU); 0 disables the cache."""
