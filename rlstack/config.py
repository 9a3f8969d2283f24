"""The run config: one typed tree, read from YAML plus dotted `key=value` overrides.

Each section lives beside the code it configures (`rlstack/<package>/config.py`); this module composes
them, applies overrides and turns validation failures into one line per problem naming the file, the
key and what is allowed. Nothing here imports torch, so a bad config fails in well under a second.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from rlstack.config_base import ConfigError, StrictModel
from rlstack.data.config import DataConfig
from rlstack.envs.config import EnvConfig, SandboxConfig
from rlstack.faults import FaultsConfig
from rlstack.learner.config import LearnerConfig
from rlstack.mispo.config import AlgorithmConfig
from rlstack.monitor.config import LoggingConfig
from rlstack.rewards.config import RewardSpec, RewardWorkersConfig
from rlstack.rollout.config import RolloutConfig

__all__ = ["ConfigError", "RunConfig", "StrictModel", "dump_config", "load_config"]


# rlstack.model.builders.BUILDERS
BuilderName = Literal["tiny", "tiny_dense", "medium", "small", "tiny_llama", "tiny_qwen3", "tiny_qwen3_moe"]


class ModelConfig(StrictModel):
    path: str | None = None
    """An HF-format checkpoint directory to start from (any causal LM that transformers and vLLM both
    implement: Llama, Qwen2/3, Qwen3-MoE, Mixtral, Step3p5, ...; docs/models.md), or `smollm2-135m` for the
    shipped SmolLM2-135M-Instruct. None = build a fresh model with `builder`."""
    builder: BuilderName = "tiny"
    """Architecture preset used when `path` is None (see rlstack.model.builders)."""
    init_seed: int = 0
    """Seed of the random initialisation when building a fresh model."""

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dtype" in data:
            raise ValueError(
                "model.dtype moved: set rollout.dtype (the vLLM engines) and learner.dtype (the DeepSpeed "
                "learner) instead"
            )
        return data


class DynamicSamplingConfig(StrictModel):
    """DAPO-style over-sampling: a step trains only on groups with learning signal (their samples' rewards
    differ) and keeps generating until it has `trainer.prompts_per_step` of them. It changes the algorithm
    (the batch is no longer an unbiased sample of the prompts; the step's `reward/*` metrics stay those of
    its first, unselected batch), so it is off by default."""

    enabled: bool = False
    """Fill each step with groups that have signal; groups without are recorded in `samples/` and dropped."""
    max_rounds: int = Field(4, ge=1)
    """Extra generation rounds per step at most, each of `prompts_per_step` new prompts with the current
    weights; a step still short after them trains on the groups with signal it has (and says so in
    `dynamic/short_groups`)."""


class TrainerConfig(StrictModel):
    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tensorboard" in data:
            raise ValueError(
                "trainer.tensorboard moved: list the sinks in logging.sinks (tensorboard, wandb, mlflow; "
                "[] = metrics.jsonl only)"
            )
        return data

    run_dir: str = "runs/default"
    """Directory for the resolved config, metrics, checkpoints, samples and logs."""
    seed: int = 0
    """Global seed (data order, sampling, filters)."""
    steps: int = Field(10, ge=0)
    """Number of RL steps (one policy update each)."""
    prompts_per_step: int = Field(16, ge=1)
    """Prompts sampled per step; each gets `rollout.sampling.n` responses."""
    mode: Literal["sync", "async"] = "sync"
    """`sync`: generate, then train, in turn. `async`: generation of the next batches runs while the
    learner trains, bounded by `max_staleness`."""
    max_staleness: int = Field(1, ge=0)
    """Async only: a rollout made with policy version v is trained on only while current - v <= k.
    k = 0 makes async identical to sync."""
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=lambda: DynamicSamplingConfig())
    """DAPO's dynamic sampling (changes the algorithm; off by default)."""
    checkpoint_every: int = Field(10, ge=0)
    """Save `checkpoints/step_N/` every N steps (0 = only at the end). A learner that dies restarts from the
    newest one (`faults.max_learner_restarts`), so this bounds the steps a learner failure redoes."""
    keep_last: int = Field(3, ge=0)
    """Keep the newest N `step_*` checkpoints (older ones are deleted after each save; 0 = keep all)."""
    eval_every: int = Field(0, ge=0)
    """Held-out evaluation every N steps (0 = only before and after training)."""
    ray_address: str | None = None
    """Ray cluster to join (`auto` under `ray job submit`). None: join RAY_ADDRESS if set, else start a
    local Ray with `local_cpus` CPUs."""
    local_cpus: int = Field(2, ge=1)
    """CPUs of the local Ray started when there is no cluster."""


class SFTConfig(StrictModel):
    steps: int = Field(200, ge=0)
    """Supervised optimizer steps of the warm start."""
    batch_size: int = Field(32, ge=1)
    """Demonstrations per step."""
    lr: float = Field(1e-3, gt=0)
    """Learning rate of the warm start (the RL learning rate is `learner.lr`)."""
    output: str = "sft"
    """Where the warm-started policy goes, relative to `trainer.run_dir` (an HF-format directory)."""


class EvalConfig(StrictModel):
    num_problems: int = Field(256, ge=1)
    """Held-out problems per evaluation."""
    samples: int = Field(4, ge=1)
    """Sampled responses per problem (temperature `temperature`), besides one greedy response."""
    temperature: float = Field(1.0, gt=0)
    """Temperature of the sampled evaluation."""


class RunConfig(StrictModel):
    """The whole run, one section per package."""

    model: ModelConfig = ModelConfig()
    """The policy checkpoint or builder."""
    trainer: TrainerConfig = TrainerConfig()
    """Loop length, mode, seeds, checkpoints and where output goes."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    """Policy loss (MIS-PO or a baseline), MIS filters, advantages, normalisation (see docs/algorithm.md)."""
    rollout: RolloutConfig = RolloutConfig()
    """vLLM rollout workers and sampling."""
    learner: LearnerConfig = LearnerConfig()
    """DeepSpeed learner ranks and optimizer."""
    data: DataConfig = DataConfig()
    """Prompts: a built-in task generator or a dataset file."""
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="math")])
    """Reward functions and weights (registered names or import paths)."""
    reward_workers: RewardWorkersConfig = RewardWorkersConfig()
    """Ray actors that compute the rewards: time limits, chunking, caching."""
    sandbox: SandboxConfig = SandboxConfig()
    """Where model-written code runs (the `code` reward, environments' tools): backend and strictness."""
    env: EnvConfig | None = None
    """Multi-turn episodes with a tool environment (TRL's environment_factory convention); None: one
    response per prompt."""
    faults: FaultsConfig = FaultsConfig()
    """Deadlines of remote calls; replacing failed rollout workers and restarting a failed learner."""
    logging: LoggingConfig = LoggingConfig()
    """Metric sinks (TensorBoard, W&B, MLflow), progress output, per-token samples (docs/metrics.md)."""
    sft: SFTConfig = SFTConfig()
    """Supervised warm start (`rlstack sft`)."""
    eval: EvalConfig = EvalConfig()
    """Held-out evaluation."""

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.algorithm.advantage == "group" and self.rollout.sampling.n < 2:
            raise ValueError("algorithm.advantage 'group' needs rollout.sampling.n >= 2 responses per prompt")
        if self.rollout.weight_sync == "nccl" and self.learner.backend == "gloo":
            raise ValueError(
                "rollout.weight_sync 'nccl' broadcasts from the learner's rank-0 GPU, but learner.backend "
                "is 'gloo' (CPU); set learner.backend 'nccl' or 'auto', or weight_sync 'gloo'/'object_store'"
            )
        if self.rollout.sampling.temperature == 0.0:
            raise ValueError(
                "rollout.sampling.temperature = 0 is greedy decoding, not a distribution the policy gradient "
                "can use; set a temperature > 0 (1.0 samples the policy itself)"
            )
        if self.learner.lr_schedule != "constant" and self.learner.lr_decay_steps is None:
            # decay over the whole run: one optimizer step per mini-batch per RL step
            total = max(self.trainer.steps * self.learner.n_minibatches, self.learner.warmup_steps + 1)
            self.learner.lr_decay_steps = total
        if self.env is not None and not self.data.chat_template:
            raise ValueError(
                "data.chat_template: false, but a tool environment (env) needs the chat template: tool calls "
                "and their results are chat turns"
            )
        if self.rollout.partial_rollouts:
            records_routing = self.learner.routing_replay == "rollout" or self.learner.moe.probe_every > 0
            if self.env is not None or records_routing:
                raise ValueError(
                    "rollout.partial_rollouts needs single-turn rollouts (no env) and no recorded routing "
                    "(learner.routing_replay other than 'rollout', learner.moe.probe_every 0)"
                )
        critic_advantage, critic_on = self.algorithm.advantage == "critic", self.learner.critic.enabled
        if critic_advantage != critic_on:
            raise ValueError(
                "algorithm.advantage 'critic' needs learner.critic.enabled: true"
                if critic_advantage
                else "learner.critic.enabled but algorithm.advantage is 'group': nothing would use the critic"
            )
        return self


# ---- loading --------------------------------------------------------------------------------------


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), schema: type[BaseModel] = RunConfig
) -> Any:
    """Read YAML (or start from defaults when `path` is None), apply `a.b=value` overrides, validate."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{source}: cannot read config file ({e.strerror})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{source}: the top level must be a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded or {}
    for item in overrides:
        apply_override(data, item)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, schema)) from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """`learner.lr=1e-5` → data["learner"]["lr"] = 1e-5; values parse as YAML (numbers, bools, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. trainer.steps=20")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = yaml.safe_load(raw) if raw.strip() else ""


def format_validation_error(error: ValidationError, source: str, schema: type[BaseModel]) -> str:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(_fields_at(schema, err["loc"][:-1]))) or "(none)"
            lines.append(f"{source}: unknown key '{loc}'; allowed keys here: {allowed}")
        else:
            lines.append(f"{source}: '{loc}': {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _fields_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found by walking `loc` down from `schema` (best effort through unions)."""
    model: Any = schema
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _model_in(field.annotation)
    return list(getattr(model, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config (defaults filled in) so a run directory says exactly what ran."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def check_resume_config(run_dir: Path, cfg: RunConfig, allow_change: bool) -> list[str]:
    """Differences between `cfg` and the config the run in `run_dir` wrote (`config.resolved.yaml`), as
    lines `dotted.key: old -> new`; a ConfigError listing them if there are any and not `allow_change`.

    `trainer.run_dir` is not compared (it names the directory, not the run), nor `trainer.steps`:
    raising it is how a finished run is extended. Anything derived from it still counts.
    """
    path = Path(run_dir) / "config.resolved.yaml"
    if not path.is_file():
        raise ConfigError(
            f"--resume {run_dir}: no config.resolved.yaml there, so no run was started in it; to start a "
            f"new run there, drop --resume and set trainer.run_dir={run_dir}"
        )
    try:
        old = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the run's resolved config ({e})") from None

    def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
        """Dotted key -> value; lists of sections (rewards) by index, other lists as one value."""
        if isinstance(node, dict):
            items: Any = node.items()
        elif isinstance(node, list) and any(isinstance(x, dict) for x in node):
            items = enumerate(node)
        else:
            return {prefix: node}
        out: dict[str, Any] = {}
        for key, value in items:
            out |= leaves(value, f"{prefix}.{key}" if prefix else str(key))
        return out

    def show(node: dict[str, Any], key: str) -> str:
        return json.dumps(node[key]) if key in node else "<absent>"

    before, after = leaves(old or {}), leaves(cfg.model_dump(mode="json"))
    ignored = ("trainer.run_dir", "trainer.steps")
    keys = [*before, *(k for k in after if k not in before)]
    changes = [
        f"{key}: {show(before, key)} -> {show(after, key)}"
        for key in keys
        if key not in ignored and (key not in before or key not in after or before[key] != after[key])
    ]
    if changes and not allow_change:
        raise ConfigError(
            f"--resume {run_dir}: the config differs from the one this run was started with ({path}):\n  "
            + "\n  ".join(changes)
            + "\nresume with the original config, or pass --allow-config-change to go on with the new one"
        )
    return changes
