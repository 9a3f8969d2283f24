"""`model.dtype` moved to `rollout.dtype` (the vLLM engines) and `learner.dtype` (the DeepSpeed learner)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlstack.config import ConfigError, load_config


def test_model_dtype_is_refused_in_one_line_naming_the_new_keys(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  builder: tiny\n  dtype: float32\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "model.dtype moved" in message and "rollout.dtype" in message and "learner.dtype" in message
    with pytest.raises(ConfigError, match=r"model\.dtype moved"):
        load_config(None, ["model.dtype=bfloat16"])


def test_rollout_and_learner_dtypes_are_separate() -> None:
    default = load_config(None)
    assert default.rollout.dtype == "float32" and default.learner.dtype == "float32"
    cfg = load_config(None, ["rollout.dtype=bfloat16"])
    assert cfg.rollout.dtype == "bfloat16" and cfg.learner.dtype == "float32"
    cfg = load_config(None, ["learner.dtype=bfloat16"])
    assert cfg.rollout.dtype == "float32" and cfg.learner.dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"rollout\.dtype"):
        load_config(None, ["rollout.dtype=float16"])


def test_shipped_configs_load() -> None:
    for path in sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml")):
        load_config(path)
