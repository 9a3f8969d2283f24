"""The CLI's one-line error path (exit 2) for bad rewards, data and checkpoints, and `train --resume` with a
changed config. Everything runs through `rlstack.cli.main` in-process; nothing starts Ray or vLLM."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from rlstack.cli import main


def write_config(path: Path, **sections: Any) -> Path:
    """A small valid config (defaults + `sections`) as YAML."""
    path.write_text(
        yaml.safe_dump({"trainer": {"steps": 2, "run_dir": str(path.parent / "run")}, **sections})
    )
    return path


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single `error: ...` line the CLI printed on stderr (and assert that it printed nothing else)."""
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---- rewards -----------------------------------------------------------------------------------------


def test_config_misspelled_reward_name(tmp_path: Path, capsys) -> None:
    cfg = write_config(tmp_path / "c.yaml", rewards=[{"name": "mathh"}])
    assert main(["config", str(cfg)]) == 2
    line = one_error_line(capsys)
    assert "unknown reward 'mathh'" in line and "math" in line.split("available:")[1]


@pytest.mark.parametrize(
    ("import_path", "message"),
    [
        ("rlstack_no_such_module_xyz:score", "cannot import module 'rlstack_no_such_module_xyz'"),
        ("json:no_such_function", "'json' has no attribute 'no_such_function'"),
    ],
)
def test_config_bad_import_path(tmp_path: Path, capsys, import_path: str, message: str) -> None:
    cfg = write_config(tmp_path / "c.yaml", rewards=[{"import_path": import_path}])
    assert main(["config", str(cfg)]) == 2
    assert message in one_error_line(capsys)


def test_config_unknown_reward_option(tmp_path: Path, capsys) -> None:
    cfg = write_config(tmp_path / "c.yaml", rewards=[{"name": "code", "options": {"time_limt": 3}}])
    assert main(["config", str(cfg)]) == 2
    line = one_error_line(capsys)
    assert (
        line.startswith("error: reward 'code': unknown option 'time_limt'; options: ")
        and "time_limit" in line
    )


def test_config_accepts_good_rewards_and_prints_the_resolved_config(tmp_path: Path, capsys) -> None:
    cfg = write_config(tmp_path / "c.yaml", rewards=[{"name": "math"}, {"import_path": "json:dumps"}])
    assert main(["config", str(cfg)]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert [r.get("name") or r["import_path"] for r in out["rewards"]] == ["math", "json:dumps"]


# ---- data --------------------------------------------------------------------------------------------


def test_config_malformed_jsonl_row(tmp_path: Path, capsys) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + '\n{"prompt": "2+2?", "answer": \n')
    cfg = write_config(tmp_path / "c.yaml", data={"path": str(data), "heldout_size": 0})
    assert main(["config", str(cfg)]) == 2
    line = one_error_line(capsys)
    assert f"{data}: line 2: not valid JSON" in line


def test_config_missing_prompt_column(tmp_path: Path, capsys) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(3))
    )
    cfg = write_config(tmp_path / "c.yaml", data={"path": str(data), "heldout_size": 0})
    assert main(["config", str(cfg)]) == 2
    line = one_error_line(capsys)
    assert f"{data}: line 1: prompt column 'prompt' is missing" in line and "data.columns" in line
    # the hint works: mapping the column makes the same file valid
    assert main(["config", str(cfg), "data.columns={prompt: question}"]) == 0


# ---- eval --------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make importing transformers or the vLLM worker fail: the checks must come before either loads."""
    for name in ("transformers", "vllm", "rlstack.rollout.worker"):
        monkeypatch.setitem(sys.modules, name, None)


def test_eval_missing_path(tmp_path: Path, capsys, no_model_libraries) -> None:
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert one_error_line(capsys) == f"error: checkpoint {tmp_path / 'nope'}: no such file or directory"


def test_eval_directory_without_config_json(tmp_path: Path, capsys, no_model_libraries) -> None:
    assert main(["eval", str(tmp_path)]) == 2
    assert "no config.json, so not an HF checkpoint directory" in one_error_line(capsys)
    # a run directory: point at its latest checkpoint
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_6\n")
    assert main(["eval", str(tmp_path)]) == 2
    assert f"its latest checkpoint is {tmp_path / 'checkpoints' / 'step_6'}" in one_error_line(capsys)


def test_eval_checkpoint_without_weights_or_not_a_directory(
    tmp_path: Path, capsys, no_model_libraries
) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert main(["eval", str(tmp_path)]) == 2
    assert "no weights (*.safetensors or *.bin)" in one_error_line(capsys)
    assert main(["eval", str(tmp_path / "config.json")]) == 2
    assert "not a directory" in one_error_line(capsys)


# ---- train --resume ----------------------------------------------------------------------------------


class FakeTrainer:
    """Stands in for rlstack.driver.Trainer: records what it was built with, trains nothing."""

    built: ClassVar[list[tuple[Any, bool, bool]]] = []

    def __init__(self, cfg: Any, resume: bool = False, allow_config_change: bool = False) -> None:
        FakeTrainer.built.append((cfg, resume, allow_config_change))

    def __enter__(self) -> FakeTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def fit(self, progress: bool = True) -> dict[str, Any]:
        acc = {"num_problems": 4, "greedy_accuracy": 0.5, "sampled_accuracy": 0.25}
        return {"before": acc, "after": acc, "checkpoint": "ckpt"}


@pytest.fixture
def fake_trainer(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, bool, bool]]:
    module = types.ModuleType("rlstack.driver")
    module.Trainer = FakeTrainer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rlstack.driver", module)
    FakeTrainer.built = []
    return FakeTrainer.built


@pytest.fixture
def started_run(tmp_path: Path) -> tuple[Path, Path]:
    """(config file, run dir holding the config.resolved.yaml that `train` would have written)."""
    cfg = write_config(tmp_path / "c.yaml", learner={"lr": 1e-4})
    run_dir = tmp_path / "run"
    assert main(["config", str(cfg), f"trainer.run_dir={run_dir}", "--out", str(run_dir)]) == 0
    return cfg, run_dir


def test_resume_with_a_changed_config_is_refused(started_run, fake_trainer, capsys) -> None:
    cfg, run_dir = started_run
    capsys.readouterr()
    assert main(["train", str(cfg), "learner.lr=2e-4", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume {run_dir}: the config differs")
    assert "\n  learner.lr: 0.0001 -> 0.0002\n" in err
    assert "--allow-config-change" in err
    assert fake_trainer == []  # refused before the Trainer (and Ray) start


def test_resume_with_allow_config_change_goes_on_and_prints_the_changes(
    started_run, fake_trainer, capsys
) -> None:
    cfg, run_dir = started_run
    capsys.readouterr()
    argv = ["train", str(cfg), "learner.lr=2e-4", "--resume", str(run_dir), "--allow-config-change"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "learner.lr: 0.0001 -> 0.0002" in err and "final checkpoint: ckpt" in out
    [(config, resume, allow)] = fake_trainer
    assert resume and allow and config.learner.lr == 2e-4 and config.trainer.run_dir == str(run_dir)


def test_resume_extending_steps_is_silent(started_run, fake_trainer, capsys) -> None:
    cfg, run_dir = started_run
    capsys.readouterr()
    assert main(["train", str(cfg), "trainer.steps=50", "--resume", str(run_dir)]) == 0
    assert capsys.readouterr().err == ""
    [(config, resume, allow)] = fake_trainer
    assert resume and not allow and config.trainer.steps == 50


def test_resume_of_a_directory_without_a_run_is_refused(tmp_path: Path, fake_trainer, capsys) -> None:
    cfg = write_config(tmp_path / "c.yaml")
    assert main(["train", str(cfg), "--resume", str(tmp_path / "empty")]) == 2
    assert "no config.resolved.yaml there" in one_error_line(capsys)
    assert main(["train", str(cfg), "--allow-config-change"]) == 2
    assert "only applies with --resume" in one_error_line(capsys)
    assert fake_trainer == []


# ---- train: the same checks, before Ray, any actor or the run directory ---------------------------------


@pytest.mark.parametrize("bad", ["reward_name", "reward_option", "jsonl_row"])
def test_train_refuses_bad_input_before_ray_starts(bad: str, tmp_path: Path, capsys) -> None:
    import ray

    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + '\n{"prompt": "2+2?", "answer": \n')
    sections = {
        "reward_name": {"rewards": [{"name": "mathh"}]},
        "reward_option": {"rewards": [{"name": "code", "options": {"time_limt": 2}}]},
        "jsonl_row": {"data": {"path": str(data), "heldout_size": 0}},
    }[bad]
    cfg = write_config(tmp_path / "c.yaml", **sections)
    assert main(["train", str(cfg), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert {"reward_name": "mathh", "reward_option": "time_limt", "jsonl_row": "line 2"}[bad] in line
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


# ---- rewards try -------------------------------------------------------------------------------------


def shouty(prompts, completions, completion_ids, answer, scale=1.0, **columns):
    """A test plugin: the answer in the completion scores `scale`; an exclamation mark breaks it."""
    from rlstack.rewards.registry import RewardResult

    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # conversational rows
    if any("!" in text for text in texts):
        raise ValueError("cannot score a shout")
    scores = [scale * float(a in text) for text, a in zip(texts, answer, strict=True)]
    info = [{"ids": len(ids), "level": lv} for ids, lv in zip(completion_ids, columns["level"], strict=True)]
    return RewardResult(scores, info)


def shouty_factory(scale: float):
    def reward(prompts, completions, **columns):
        return [scale] * len(completions)

    return reward


def write_rows(path: Path) -> Path:
    rows = [
        {"prompt": "2+2?", "answer": "4", "level": 1, "completion": "it is 4", "completion_ids": [1, 2]},
        {"prompt": [{"role": "user", "content": "3+3?"}], "answer": "6", "level": 2, "completion": "6!"},
        {"prompt": "1+1?", "answer": "2", "level": 3, "completion": "3"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rewards_try_prints_scores_unscored_rows_and_info(tmp_path: Path, capsys) -> None:
    data = write_rows(tmp_path / "rows.jsonl")
    argv = ["rewards", "try", f"{__name__}:shouty", "--options", '{"scale": 2}', str(data), "--rows", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "row 1 (prompt_id rows-1): score 2"
    assert out[2] == '    info: {"ids": 2, "level": 1}'
    # the failing row costs only itself: unscored, with the plugin's error as the reason, as in training
    assert out[3] == (
        f"row 2 (prompt_id rows-2): unscored: {__name__}:shouty: ValueError: cannot score a shout"
    )
    assert '"error": "ValueError: cannot score a shout"' in out[4] and '"prompt_id": "rows-2"' in out[4]
    assert out[5] == "row 3 (prompt_id rows-3): score 0"
    assert out[-1].startswith("2 scored, 1 unscored (errors 1, timeouts 0), mean 1;")


def test_rewards_try_a_factory_and_a_builtin(tmp_path: Path, capsys) -> None:
    data = write_rows(tmp_path / "rows.jsonl")
    argv = ["rewards", "try", f"{__name__}:shouty_factory", "--factory", "--options", '{"scale": 0.5}']
    assert main([*argv, str(data), "--rows", "1"]) == 0
    assert "row 1 (prompt_id rows-1): score 0.5" in capsys.readouterr().out
    assert main(["rewards", "try", "math", str(data), "--completion-column", "answer"]) == 0
    out = capsys.readouterr().out
    assert "3 row(s)" in out and "unscored: no configured reward applies" in out  # no \boxed{}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mathh"], "unknown reward 'mathh'"),
        (["math", "--options", "{scale"], "--options: not JSON"),
        (["math", "--options", '{"scale": 2}'], "reward 'math': unknown option 'scale'"),
        (["math", "--completion-column", "reply"], "completion column 'reply' is missing; columns:"),
    ],
)
def test_rewards_try_user_mistakes_are_one_line(
    args: list[str], message: str, tmp_path: Path, capsys
) -> None:
    data = write_rows(tmp_path / "rows.jsonl")
    assert main(["rewards", "try", *args, str(data)]) == 2
    assert message in one_error_line(capsys)
