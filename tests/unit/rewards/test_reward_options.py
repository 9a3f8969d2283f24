"""Reward options checked at config time (`validate_specs`): options models of the built-ins and of plugins,
signatures of plain functions and factories, unknown names and bad import paths; factories called once."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from rlstack.rewards import RewardError, RewardGroup, RewardSpec
from rlstack.rewards.config import RewardWorkersConfig
from rlstack.rewards.registry import resolve, validate_specs

FACTORY_CALLS: list[dict[str, Any]] = []


def scaled_length(
    prompts: list[Any], completions: list[Any], scale: float = 1.0, **columns: Any
) -> list[float]:
    return [scale * len(c) for c in completions]


def strict_length(prompts: list[Any], completions: list[Any], completion_ids: list[Any], scale: float = 1.0):
    """No **kwargs: every option it cannot take is caught."""
    return [scale * len(c) for c in completions]


def positional_only_columns(prompts: list[Any], completions: list[Any], answer: list[Any]) -> list[float]:
    """Lacks completion_ids and **kwargs: it cannot be called as TRL calls rewards."""
    return [0.0 for _ in completions]


class BonusOptions(BaseModel):
    bonus: float = Field(1.0, ge=0)


def with_model(prompts: list[Any], completions: list[Any], bonus: float = 1.0, **columns: Any) -> list[float]:
    return [bonus for _ in completions]


with_model.options_model = BonusOptions  # type: ignore[attr-defined]


def length_cap(max_len: int, penalty: float = -1.0):
    """A factory, as TRL's get_* rewards: its options configure the reward it returns."""
    FACTORY_CALLS.append({"max_len": max_len, "penalty": penalty})

    def reward(completions: list[Any], completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        return [penalty if len(ids) > max_len else 0.0 for ids in completion_ids]

    return reward


def refusing_factory(level: int):
    raise ValueError(f"level {level} is not supported")


def spec(fn: Any, **kw: Any) -> RewardSpec:
    return RewardSpec(import_path=f"{__name__}:{fn.__name__}", **kw)


def error(specs: list[RewardSpec]) -> str:
    with pytest.raises(RewardError) as err:
        validate_specs(specs)
    message = str(err.value)
    assert "\n" not in message  # one line, for `rlstack config` and the driver's log
    return message


@pytest.mark.parametrize(
    ("reward", "options", "message"),
    [
        (
            "code",
            {"time_limt": 3},
            "reward 'code': unknown option 'time_limt'; options: time_limit, memory_mb",
        ),
        (
            "code",
            {"time_limit": "fast"},
            "reward 'code': option 'time_limit': Input should be a valid number",
        ),
        (
            "code",
            {"concurrency": 0},
            "reward 'code': option 'concurrency': Input should be greater than or equal",
        ),
        ("math", {"tolerance": 0.1}, "reward 'math': unknown option 'tolerance'; options: (none"),
        ("puzzle", {"strict": True}, "reward 'puzzle': unknown option 'strict'"),
        ("genrm", {"temprature": 0.5}, "reward 'genrm': unknown option 'temprature'"),
        ("genrm", {"samples": 2.5}, "reward 'genrm': option 'samples': Input should be a valid integer"),
        ("preference", {"label_colum": "gold"}, "reward 'preference': unknown option 'label_colum'"),
        (
            "metarm",
            {"base_options": {"mdoe": "pairwise"}},
            "option 'base_options': reward 'genrm': unknown option 'mdoe'",
        ),
        ("metarm", {"base": "mathh"}, "reward 'metarm': option 'base': unknown reward 'mathh'"),
        ("metarm", {"penalty": 2, "combine": "multiply"}, "reward 'metarm': option penalty must be >= 0"),
    ],
)
def test_builtin_options_models_name_the_reward_and_the_option(
    reward: str, options: dict[str, Any], message: str
) -> None:
    assert message in error([RewardSpec(name=reward, options=options)])


def test_valid_builtin_options_pass_and_are_bound_validated() -> None:
    specs = [
        RewardSpec(name="code", options={"time_limit": 3, "concurrency": 2}),
        RewardSpec(name="genrm", options={"mode": "pairwise", "samples": 4}),
        RewardSpec(name="metarm", options={"base": "preference", "base_options": {"label_column": "gold"}}),
    ]
    validate_specs(specs)
    bound = resolve(specs[0])
    assert bound.keywords == {"time_limit": 3.0, "concurrency": 2}  # type: ignore[attr-defined]
    assert isinstance(bound.keywords["time_limit"], float)  # type: ignore[attr-defined]


def test_a_plugins_own_options_model() -> None:
    assert "unknown option 'bonnus'; options: bonus" in error([spec(with_model, options={"bonnus": 2})])
    assert "option 'bonus': Input should be greater than or equal to 0" in error(
        [spec(with_model, options={"bonus": -1})]
    )
    validate_specs([spec(with_model, options={"bonus": 2})])


def test_plain_functions_are_checked_against_their_signature() -> None:
    # no **kwargs: a misspelled option is caught, with what the function takes
    message = error([spec(strict_length, options={"scael": 2})])
    assert f"reward '{__name__}:strict_length': unknown option 'scael'" in message
    assert "takes: prompts, completions, completion_ids, scale" in message
    # a wrongly typed option, by the annotation
    assert "option 'scale': Input should be a valid number" in error(
        [spec(strict_length, options={"scale": "x"})]
    )
    # with **kwargs any name may be a column or an option: only types of named parameters are checked
    validate_specs([spec(scaled_length, options={"scael": 2})])
    assert "option 'scale'" in error([spec(scaled_length, options={"scale": [1]})])
    # names the call itself passes
    assert "option 'completions' is what every call passes" in error(
        [spec(scaled_length, options={"completions": ["x"]})]
    )
    # a function that cannot take completion_ids
    message = error([spec(positional_only_columns)])
    assert "does not take completion_ids" in message and "add **kwargs" in message


def test_factories_are_checked_against_the_factory_signature() -> None:
    assert "unknown option 'max_length'; the factory takes: max_len, penalty" in error(
        [spec(length_cap, factory=True, options={"max_length": 3})]
    )
    assert "the factory needs option 'max_len'" in error(
        [spec(length_cap, factory=True, options={"penalty": -2})]
    )
    assert "option 'max_len': Input should be a valid integer" in error(
        [spec(length_cap, factory=True, options={"max_len": "three"})]
    )
    # a factory configured as a plain reward: the hint says so
    assert "set `factory: true`" in error([spec(length_cap, options={"max_len": 3})])
    # TRL's factory, unchanged
    trl = "trl.rewards:get_soft_overlong_punishment"
    assert "unknown option 'max_completion_length'" in error(
        [
            RewardSpec(
                import_path=trl, factory=True, options={"max_completion_length": 8, "soft_punish_cache": 2}
            )
        ]
    )
    validate_specs(
        [RewardSpec(import_path=trl, factory=True, options={"max_completion_len": 8, "soft_punish_cache": 2})]
    )


def test_factory_is_called_once_per_scoring_process_with_the_options() -> None:
    FACTORY_CALLS.clear()
    specs = [spec(length_cap, factory=True, options={"max_len": 2, "penalty": -0.5})]
    validate_specs(specs)
    assert FACTORY_CALLS == []  # checking a config never runs the factory
    group = RewardGroup(specs, RewardWorkersConfig(num_workers=0))
    for _ in range(3):
        out = group(["p", "p"], ["ab", "abc"], completion_ids=[[1, 2], [1, 2, 3]])
        assert out.total == [0.0, -0.5]
    assert FACTORY_CALLS == [{"max_len": 2, "penalty": -0.5}]
    with pytest.raises(RewardError, match=r"the factory raised ValueError: level 7 is not supported"):
        RewardGroup.in_process([spec(refusing_factory, factory=True, options={"level": 7})])


def test_unknown_names_and_bad_import_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unknown = error([RewardSpec(name="acuracy")])
    assert "unknown reward 'acuracy'; available: code, env, genrm, math" in unknown
    assert "import_path 'no_such_mod:f': cannot import module 'no_such_mod'" in error(
        [RewardSpec(import_path="no_such_mod:f")]
    )
    assert "import_path 'trl.rewards:acuracy_reward': 'trl.rewards' has no attribute" in error(
        [RewardSpec(import_path="trl.rewards:acuracy_reward")]
    )
    (tmp_path / "broken_rewards_mod.py").write_text(textwrap.dedent("def f(:\n    pass\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "cannot import module 'broken_rewards_mod': SyntaxError" in error(
        [RewardSpec(import_path="broken_rewards_mod:f")]
    )
    assert "is a int, not a function" in error([RewardSpec(import_path=f"{__name__}:NOT_CALLABLE")])
    assert "configured twice: math" in error([RewardSpec(name="math"), RewardSpec(name="math", weight=2)])


NOT_CALLABLE = 3
