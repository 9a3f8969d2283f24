"""The run config: one typed tree, read from YAML plus dotted `key=value` overrides.

Each section lives beside the code it configures (`rlstack/<package>/config.py`); this module composes
them, applies overrides and turns validation failures into one line per problem naming the file, the
key and what is allowed. Nothing here imports torch, so a bad config fails in well under a second.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlstack.mispo.config import AlgorithmConfig


class ConfigError(ValueError):
    """A user's config is wrong; the message says where and what is allowed."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors and each field carries a docstring."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(StrictModel):
    path: str | None = None
    """An HF-format checkpoint directory to start from. None = build a fresh model with `builder`."""
    builder: Literal["tiny", "small"] = "tiny"
    """Architecture preset used when `path` is None (see rlstack.model.builders)."""
    init_seed: int = 0
    """Seed of the random initialisation when building a fresh model."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype for rollout and learner. Keep float32 on CPU: bf16 log-probs differ by up to
    3.5 nats from fp32, which would swamp the MIS-PO ratios."""


class TrainerConfig(StrictModel):
    run_dir: str = "runs/default"
    """Directory for the resolved config, metrics, checkpoints, samples and logs."""
    seed: int = 0
    """Global seed (data order, sampling, filters)."""
    steps: int = Field(10, ge=0)
    """Number of RL steps (one policy update each)."""


class RunConfig(StrictModel):
    """The whole run. Sections appear here as the packages that own them land."""

    model: ModelConfig = ModelConfig()
    """The policy checkpoint or builder."""
    trainer: TrainerConfig = TrainerConfig()
    """Loop length, seeds and where output goes."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    """Policy loss (MIS-PO or a baseline), MIS filters, advantages, normalisation (see docs/MISPO.md)."""


# ---- loading --------------------------------------------------------------------------------------


def load_config(
    path: str | Path | None, overrides: list[str] = (), schema: type[BaseModel] = RunConfig
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
