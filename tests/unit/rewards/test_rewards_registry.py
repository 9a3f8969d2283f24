"""Reward registry: names, duplicates, import paths, entry points, TRL functions, checks, async, group."""

from __future__ import annotations

import asyncio
import doctest
import importlib
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import rlstack.rewards.registry as registry_module
from rlstack.rewards import (
    RewardError,
    RewardGroup,
    RewardSpec,
    call_reward,
    get_reward,
    list_rewards,
    register,
    resolve,
    reward_names,
)


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test disappear after it."""
    monkeypatch.setattr(registry_module, "_REWARDS", dict(registry_module._REWARDS))


def test_builtin_names_and_duplicates(scratch_registry: None) -> None:
    assert {"math", "puzzle"} <= set(reward_names())
    with pytest.raises(
        RewardError, match=r"'math' is already registered \(rlstack.rewards.math_verify.math_reward\)"
    ):
        register("math")(lambda prompts, completions, **kw: [1.0] * len(completions))

    @register("always_one")
    def always_one(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [1.0] * len(completions)

    assert get_reward("always_one") is always_one
    with pytest.raises(RewardError, match="'always_one' is already registered"):
        register("always_one")(always_one)


def test_unknown_name_lists_available() -> None:
    with pytest.raises(RewardError) as err:
        get_reward("acuracy")
    message = str(err.value)
    assert "unknown reward 'acuracy'; available: " in message
    assert "math" in message and "puzzle" in message and "import_path" in message


def _write_module(root: Path, name: str, source: str) -> None:
    (root / f"{name}.py").write_text(textwrap.dedent(source))
    importlib.invalidate_caches()


def test_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(
        tmp_path,
        "my_rewards_mod",
        """
        def shorter_is_better(prompts, completions, **kwargs):
            return [1.0 / (1 + len(c)) for c in completions]

        class Holder:
            @staticmethod
            def zero(prompts, completions, **kwargs):
                return [0.0 for _ in completions]

        NOT_CALLABLE = 3
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = resolve(RewardSpec(import_path="my_rewards_mod:shorter_is_better"))
    assert call_reward(fn, ["p", "p"], ["", "abc"]) == [1.0, 0.25]
    assert resolve(RewardSpec(import_path="my_rewards_mod:Holder.zero"))(None, ["a"]) == [0.0]
    with pytest.raises(RewardError, match="cannot import module 'no_such_mod'"):
        resolve(RewardSpec(import_path="no_such_mod:f"))
    with pytest.raises(RewardError, match="'my_rewards_mod' has no attribute 'nope'"):
        resolve(RewardSpec(import_path="my_rewards_mod:nope"))
    with pytest.raises(RewardError, match="is a int, not a function"):
        resolve(RewardSpec(import_path="my_rewards_mod:NOT_CALLABLE"))


def _dist(root: Path, name: str, entry_points: str) -> None:
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def test_entry_point_from_an_installed_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(
        tmp_path,
        "acme_rewards",
        """
        def has_please(prompts, completions, **kwargs):
            return [float("please" in c) for c in completions]
        """,
    )
    _dist(tmp_path, "acme_rewards", "[rlstack.rewards]\npoliteness = acme_rewards:has_please\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    assert "politeness" in reward_names()
    assert list_rewards()["politeness"] == "entry point acme_rewards: acme_rewards:has_please"
    fn = get_reward("politeness")
    assert call_reward(fn, ["p", "p"], ["please do", "do it"], name="politeness") == [1.0, 0.0]
    assert RewardGroup.in_process([RewardSpec(name="politeness", weight=0.5)])(["p"], ["please"]).total == [
        0.5
    ]


def test_entry_point_clash_and_broken_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _dist(tmp_path, "pkg_a", "[rlstack.rewards]\nsame = pkg_a:f\nbroken = missing_module_xyz:f\n")
    _dist(tmp_path, "pkg_b", "[rlstack.rewards]\nsame = pkg_b:f\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match=r"'same' is provided by several entry points: .*pkg_a.*pkg_b"):
        get_reward("same")
    with pytest.raises(RewardError, match="cannot load entry point missing_module_xyz:f of pkg_a"):
        get_reward("broken")


# TRL-style rewards, written exactly as for trl.GRPOTrainer: keyword arguments, columns in **kwargs.
def format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    pattern = r"^<think>.*?</think>"
    contents = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if re.match(pattern, c) else 0.0 for c in contents]


def accuracy_reward(completions: list[str], solution: list[str], **kwargs: Any) -> list[float | None]:
    return [None if s is None else float(c.strip() == s) for c, s in zip(completions, solution, strict=True)]


def test_trl_style_functions_run_unchanged() -> None:
    completions = ["<think>hm</think>4", "4"]
    assert call_reward(format_reward, ["q", "q"], completions) == [1.0, 0.0]
    chat = [[{"role": "assistant", "content": c}] for c in completions]
    assert call_reward(format_reward, ["q", "q"], chat) == [1.0, 0.0]
    out = call_reward(accuracy_reward, ["q"] * 3, ["4", "5", "6"], solution=["4", "4", None], level=[1, 2, 3])
    assert out == [1.0, 0.0, None]


def test_bad_outputs_name_the_plugin() -> None:
    def short(prompts: list[str], completions: list[str], **kw: Any) -> list[float]:
        return [1.0]

    with pytest.raises(RewardError, match="reward 'short' returned 1 values for 2 completions"):
        call_reward(short, ["a", "b"], ["a", "b"])
    cases = [
        ("a dict", {"a": 1.0}, "returned dict; expected a list of 1 floats/None"),
        ("a float", 1.0, "returned float"),
        ("text", ["good"], r"returned 'good' at index 0"),
        ("nan", [float("nan")], "returned nan at index 0; rewards must be finite"),
    ]
    for name, value, message in cases:
        with pytest.raises(RewardError, match=f"reward '{name}' {message}"):
            call_reward(lambda prompts, completions, v=value, **kw: v, ["p"], ["c"], name=name)
    assert call_reward(lambda prompts, completions, **kw: (True, 2), ["p", "q"], ["c", "d"]) == [1.0, 2.0]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        call_reward(short, ["a", "b"], ["a"])


async def slow_length(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    await asyncio.sleep(0.01)  # e.g. a call to a judge model
    return [float(len(c)) for c in completions]


def test_async_reward_from_sync_code_and_from_a_running_loop() -> None:
    assert call_reward(slow_length, ["p", "p"], ["ab", "abc"]) == [2.0, 3.0]

    async def inside_a_loop() -> list[float | None]:
        return call_reward(slow_length, ["p"], ["abcd"])

    assert asyncio.run(inside_a_loop()) == [4.0]


def test_reward_spec_validation() -> None:
    assert RewardSpec(name="math").label == "math"
    assert RewardSpec(import_path="pkg.mod:fn", weight=0.5).label == "pkg.mod:fn"
    with pytest.raises(ValidationError, match="exactly one of `name`"):
        RewardSpec()
    with pytest.raises(ValidationError, match="exactly one of `name`"):
        RewardSpec(name="math", import_path="pkg.mod:fn")
    with pytest.raises(ValidationError, match=r"must look like package\.module:function"):
        RewardSpec(import_path="pkg.mod.fn")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        RewardSpec(name="math", wieght=2.0)  # type: ignore[call-arg]


def test_group_weighted_sum_over_rewards_that_apply() -> None:
    group = RewardGroup.in_process(
        [RewardSpec(name="math", weight=1.0), RewardSpec(name="puzzle", weight=0.5)]
    )
    completions = ["\\boxed{7}", "\\boxed{3+4}", "\\boxed{8}"]
    columns = {"answer": ["7", None, "7"], "numbers": [None, [3, 4], None], "target": [None, 7, None]}
    out = group(["p"] * 3, completions, **columns)
    assert out.per_reward == {"math": [1.0, None, 0.0], "puzzle": [None, 1.0, None]}
    assert out.total == [1.0, 0.5, 0.0]
    assert group(["p"], ["\\boxed{1}"]).total == [None]  # no column for either: nothing applies
    with pytest.raises(RewardError, match="configured twice: math"):
        RewardGroup.in_process([RewardSpec(name="math"), RewardSpec(name="math", weight=2.0)])
    with pytest.raises(RewardError, match="no rewards configured"):
        RewardGroup.in_process([])
    with pytest.raises(RewardError, match=r"reward label.*accuracy would overwrite the metric"):
        RewardGroup.in_process([RewardSpec(name="accuracy")])
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        RewardGroup.in_process([RewardSpec(name="nope")])


def test_doctests() -> None:
    assert doctest.testmod(registry_module).failed == 0
