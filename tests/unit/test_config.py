"""Config loading: YAML + dotted overrides, strict keys, one-line errors naming file, key and choices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlstack.cli import main
from rlstack.config import ConfigError, RunConfig, check_resume_config, dump_config, load_config

REPO = Path(__file__).resolve().parents[2]


def test_every_shipped_config_parses() -> None:
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "configs/ is empty"
    for path in configs:
        assert isinstance(load_config(path), RunConfig), path


def test_overrides_are_typed_and_nested(tmp_path: Path) -> None:
    cfg = load_config(
        REPO / "configs/demo.yaml",
        ["trainer.steps=7", "algorithm.token_band=[0.25, 4]", "algorithm.name=gspo"],
    )
    assert cfg.trainer.steps == 7
    assert cfg.algorithm.token_band == (0.25, 4.0)
    assert cfg.algorithm.name == "gspo"


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"step": 3}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "'trainer.step'" in message
    assert "steps" in message.split("allowed keys here: ")[1].split(", ")
    assert "\n" not in message  # one line for one problem


def test_wrong_value_lists_the_allowed_values() -> None:
    with pytest.raises(
        ConfigError, match=r"'algorithm.name': Input should be 'mispo', 'grpo', 'gspo' or 'ppo'"
    ):
        load_config(REPO / "configs/demo.yaml", ["algorithm.name=dpo"])
    with pytest.raises(ConfigError, match=r"'trainer.steps'.*got 'many'"):
        load_config(None, ["trainer.steps=many"])


def test_malformed_override_and_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        load_config(None, ["trainer.steps"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_cli_writes_resolved_config_and_reports_errors_in_one_line(tmp_path: Path, capsys) -> None:
    assert main(["config", str(REPO / "configs/demo.yaml"), "trainer.steps=3", "--out", str(tmp_path)]) == 0
    resolved = yaml.safe_load((tmp_path / "config.resolved.yaml").read_text())
    assert resolved["trainer"]["steps"] == 3
    assert resolved["algorithm"]["traj_band"] == [0.996, 1.001]  # defaults are filled in
    assert main(["config", str(REPO / "configs/demo.yaml"), "learnr.lr=1e-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "unknown key 'learnr'" in err and len(err.splitlines()) == 1
    assert "learner" in err  # the allowed section names are listed


def test_help_lists_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rlstack.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("train", "sft", "eval", "config", "model"):
        assert command in out


def test_critic_advantage_and_critic_learner_must_agree() -> None:
    with pytest.raises(ConfigError, match=r"needs learner\.critic\.enabled"):
        load_config(None, ["algorithm.advantage=critic"])
    with pytest.raises(ConfigError, match="nothing would use the critic"):
        load_config(None, ["learner.critic.enabled=true"])
    cfg = load_config(None, ["algorithm.advantage=critic", "learner.critic.enabled=true"])
    assert cfg.learner.critic.enabled


@pytest.mark.parametrize("sync", ["object_store", "gloo", "nccl"])
def test_weight_sync_choices_are_accepted(sync: str) -> None:
    cfg = load_config(None, [f"rollout.weight_sync={sync}"])
    assert cfg.rollout.weight_sync == sync


@pytest.mark.parametrize("backend", ["auto", "nccl"])
def test_nccl_weight_sync_accepts_a_learner_that_can_be_on_gpus(backend: str) -> None:
    cfg = load_config(None, ["rollout.weight_sync=nccl", f"learner.backend={backend}"])
    assert (cfg.rollout.weight_sync, cfg.learner.backend) == ("nccl", backend)


def test_nccl_weight_sync_refuses_a_gloo_learner() -> None:
    with pytest.raises(ConfigError, match=r"weight_sync 'nccl'.*learner.backend is 'gloo'") as err:
        load_config(None, ["rollout.weight_sync=nccl", "learner.backend=gloo"])
    assert "\n" not in str(err.value).strip()  # one line


def test_gloo_weight_sync_works_with_a_gloo_learner() -> None:
    cfg = load_config(None, ["rollout.weight_sync=gloo", "learner.backend=gloo"])
    assert cfg.rollout.weight_sync == "gloo"


@pytest.mark.parametrize(("sync", "transport"), [("gloo", "gloo"), ("nccl", "nccl"), ("object_store", None)])
def test_weight_sync_choice_picks_the_backend(sync: str, transport: str | None) -> None:
    from rlstack.rollout.sync import make_backend
    from rlstack.rollout.sync.broadcast import BroadcastBackend

    backend = make_backend(load_config(None, [f"rollout.weight_sync={sync}"]).rollout.weight_sync, [], 1)
    assert isinstance(backend, BroadcastBackend) == (transport is not None)
    assert getattr(backend, "transport", None) == transport


def test_unknown_weight_sync_is_refused_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"rollout.weight_sync.*object_store.*nccl.*gloo"):
        load_config(None, ["rollout.weight_sync=shm"])


def test_gspo_resolves_loss_norm_to_seq_mean_unless_set(tmp_path: Path) -> None:
    gspo = load_config(None, ["algorithm.name=gspo"])
    assert gspo.algorithm.loss_norm == "seq_mean"
    assert gspo.model_dump(mode="json")["algorithm"]["loss_norm"] == "seq_mean"  # what the run dir records
    assert load_config(None, []).algorithm.loss_norm == "token_mean"
    explicit = load_config(None, ["algorithm.name=gspo", "algorithm.loss_norm=token_mean"])
    assert explicit.algorithm.loss_norm == "token_mean"
    assert (
        main(["config", str(REPO / "configs/demo.yaml"), "algorithm.name=gspo", "--out", str(tmp_path)]) == 0
    )
    resolved = yaml.safe_load((tmp_path / "config.resolved.yaml").read_text())["algorithm"]
    # demo.yaml leaves loss_norm to the algorithm: a GSPO run of it gets GSPO's sequence-level objective
    assert (resolved["name"], resolved["loss_norm"]) == ("gspo", "seq_mean")


def _started_run(tmp_path: Path, overrides: list[str]) -> tuple[Path, RunConfig]:
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"trainer.run_dir={run_dir}", *overrides])
    dump_config(cfg, run_dir / "config.resolved.yaml")
    return run_dir, cfg


def test_check_resume_config_lists_changed_keys(tmp_path: Path) -> None:
    run_dir, cfg = _started_run(tmp_path, ["rewards=[{name: math}]"])
    assert check_resume_config(run_dir, cfg, allow_change=False) == []
    # moving the directory, or extending the run, is no change
    same = load_config(None, ["trainer.run_dir=elsewhere", "trainer.steps=500", "rewards=[{name: math}]"])
    assert check_resume_config(run_dir, same, allow_change=False) == []

    new = load_config(
        None,
        [
            f"trainer.run_dir={run_dir}",
            "algorithm.name=gspo",
            "rewards=[{name: math, weight: 2}, {name: puzzle}]",
        ],
    )
    changes = check_resume_config(run_dir, new, allow_change=True)
    assert changes[:4] == [
        'algorithm.name: "mispo" -> "gspo"',
        'algorithm.loss_norm: "token_mean" -> "seq_mean"',  # follows the algorithm (nobody set it)
        "rewards.0.weight: 1.0 -> 2.0",
        'rewards.1.name: <absent> -> "puzzle"',
    ]
    # the rest: the other fields of the added reward, e.g. its weight
    assert "rewards.1.weight: <absent> -> 1.0" in changes
    assert all(line.startswith("rewards.1.") and "<absent> ->" in line for line in changes[4:])
    with pytest.raises(ConfigError) as err:
        check_resume_config(run_dir, new, allow_change=False)
    message = str(err.value)
    assert (
        message.startswith(f"--resume {run_dir}: the config differs") and "--allow-config-change" in message
    )
    assert all(f"\n  {line}\n" in message + "\n" for line in changes)


def test_check_resume_config_reports_keys_missing_from_either_side(tmp_path: Path) -> None:
    run_dir, cfg = _started_run(tmp_path, [])
    old = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    del old["algorithm"]["kl_coef"]  # written by an older rlstack without the key
    old["algorithm"]["retired_option"] = 3  # a key this rlstack no longer has
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(old))
    assert check_resume_config(run_dir, cfg, allow_change=True) == [
        "algorithm.retired_option: 3 -> <absent>",
        "algorithm.kl_coef: <absent> -> 0.0",
    ]


def test_check_resume_config_needs_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.resolved\.yaml there"):
        check_resume_config(tmp_path, load_config(None, []), allow_change=True)
