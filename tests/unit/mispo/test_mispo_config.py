"""AlgorithmConfig: defaults from docs/algorithm.md, strict parsing, readable errors."""

import math

import pytest
from pydantic import ValidationError

from rlstack.mispo import AlgorithmConfig


def test_defaults_follow_the_spec():
    cfg = AlgorithmConfig()
    assert cfg.name == "mispo"
    assert cfg.token_band == (0.5, 2.0)
    assert cfg.traj_band == (0.996, 1.001)
    assert cfg.traj_filter == "fixed"
    assert cfg.adaptive_ema == 0.9
    assert cfg.adaptive_log_band_min == pytest.approx(math.log(1.0002))
    assert cfg.adaptive_log_band_max == pytest.approx(math.log(1.01))
    assert (cfg.clip_eps, cfg.gspo_clip_eps) == (0.2, 1e-4)
    assert (cfg.advantage, cfg.loss_norm, cfg.kl_coef, cfg.tis_cap) == ("group", "token_mean", 0.0, None)
    assert cfg.stochastic_tau == 0.0036


@pytest.mark.parametrize(
    ("name", "expected"),
    [("gspo", "seq_mean"), ("mispo", "token_mean"), ("grpo", "token_mean"), ("ppo", "token_mean")],
)
def test_loss_norm_default_follows_the_algorithm(name: str, expected: str):
    cfg = AlgorithmConfig.model_validate({"name": name})
    assert cfg.loss_norm == expected
    assert cfg.model_dump()["loss_norm"] == expected  # the resolved config shows the value used
    assert AlgorithmConfig(name=name).loss_norm == expected


@pytest.mark.parametrize("norm", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("name", ["gspo", "mispo"])
def test_explicit_loss_norm_is_kept(name: str, norm: str):
    assert AlgorithmConfig.model_validate({"name": name, "loss_norm": norm}).loss_norm == norm


def test_every_field_has_a_docstring():
    missing = [name for name, f in AlgorithmConfig.model_fields.items() if not f.description]
    assert missing == []


def test_yaml_style_lists_parse_to_tuples():
    cfg = AlgorithmConfig.model_validate({"token_band": [0.25, 4], "traj_filter": "off"})
    assert cfg.token_band == (0.25, 4.0)


def test_unknown_field_is_rejected():
    with pytest.raises(ValidationError, match="extra"):
        AlgorithmConfig(token_bnad=(0.5, 2.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token_band": (2.0, 0.5)}, "token_band = \\(2.0, 0.5\\): need 0 < lo <= hi"),
        ({"traj_band": (0.0, 1.0)}, "traj_band"),
        ({"adaptive_target_acceptance": 0.0}, "adaptive_target_acceptance"),
        ({"adaptive_ema": 1.0}, "adaptive_ema"),
        ({"adaptive_log_band_min": 0.1, "adaptive_log_band_max": 0.01}, "need 0 < min <= max"),
        ({"clip_eps": 0.0}, "clip_eps"),
        ({"stochastic_tau": 0.0}, "stochastic_tau = 0.0: must be > 0"),
        ({"loss_norm": "sum"}, "token_mean"),
        ({"tis_cap": -1.0}, "tis_cap"),
        ({"kl_coef": -0.001}, "kl_coef"),
        ({"name": "ppo2"}, "mispo"),
    ],
)
def test_invalid_values_give_clear_errors(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        AlgorithmConfig(**kwargs)
