"""Metric sinks chosen in `logging.sinks`: each store, read back with its own library, holds exactly the
scalars of metrics.jsonl; a resumed run continues the same W&B and MLflow runs; a step redone after a
restart is not lost (TensorBoard hides the undone values, W&B and MLflow keep them before a redo marker); a
missing package or a bad store fails when the sink opens, naming it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil
import pytest
from sink_readback import expected, read_back

from rlstack.metrics import MetricsSink, read_metrics, truncate_metrics
from rlstack.monitor.config import LoggingConfig, MlflowConfig, WandbConfig
from rlstack.monitor.sinks import RUNS_FILE, SinkError, mlflow_key, mlflow_params, scalars_of

RUN_CONFIG = {"trainer": {"steps": 4, "lr": 1e-5}, "rewards": [{"name": "math"}], "model": {"path": None}}


@pytest.fixture(autouse=True)
def _sink_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B's caches, settings and core logs into tmp_path, never the network; MLflow's file-store opt-in
    unset (the sink sets it) and restored afterwards."""
    home = tmp_path / "wandb_home"
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # recorded, so whatever the sink sets is undone
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RLSTACK_STRICT_METRICS", "0")  # made-up metric names: the stores are under test


def _session_one(run_dir: Path, cfg: LoggingConfig) -> None:
    """Steps 0-3 (an evaluation at 0 and 3, a nested `placement` record, non-finite values), then a restart
    within the session that redoes steps 2-3."""
    sink = MetricsSink(run_dir, cfg, run_config=RUN_CONFIG)
    sink.log(0, {"placement": {"driver": {"node": "n0"}}})
    sink.log(0, {"eval/acc": 0.25})
    for step in (1, 2, 3):
        sink.log(
            step,
            {"loss": 1 / (step + 7), "reward/mean": step * 0.1, "tokens": 100 * step, "bad": float("nan")},
        )
    sink.log(3, {"eval/acc": 0.5})
    truncate_metrics(run_dir, 1)  # what the driver does after a learner restart from step 1
    sink.redo(2)
    for step in (2, 3):
        sink.log(
            step,
            {"loss": 2 / (step + 7), "reward/mean": step * 0.2, "tokens": 100 * step, "bad": float("inf")},
        )
    sink.close()


def _session_two(run_dir: Path, cfg: LoggingConfig) -> None:
    """A resumed run from the checkpoint of step 2: redoes 3, then 4."""
    truncate_metrics(run_dir, 2)
    sink = MetricsSink(run_dir, cfg, run_config={**RUN_CONFIG, "trainer": {"steps": 5, "lr": 1e-5}})
    for step in (3, 4):
        sink.log(step, {"loss": 3 / (step + 7), "reward/mean": step * 0.3, "tokens": 100 * step})
    sink.close()


def _no_wandb_processes() -> list[str]:
    """Live wandb processes among this process's children (an exited one not yet reaped, a zombie, holds
    nothing and reads no command line)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            command = " ".join(p.cmdline())
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
        if "wandb" in command:
            found.append(command)
    return found


def test_tensorboard_and_wandb_hold_what_metrics_jsonl_holds_across_redo_and_resume(tmp_path: Path) -> None:
    import wandb  # noqa: F401  (a dependency of rlstack: a missing one fails here)

    cfg = LoggingConfig(sinks=["tensorboard", "wandb"], wandb=WandbConfig(project="test"))
    _session_one(tmp_path, cfg)
    assert not _no_wandb_processes(), "close() leaves no wandb-core behind"
    run_id = json.loads((tmp_path / RUNS_FILE).read_text())["wandb"]["id"]
    _session_two(tmp_path, cfg)
    assert not _no_wandb_processes()

    assert json.loads((tmp_path / RUNS_FILE).read_text())["wandb"]["id"] == run_id  # the same W&B run
    sessions = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(sessions) == 2
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 0, 1, 2, 3, 4]  # the evaluation at 3 was undone
    want = {
        "loss": [(1, 1 / 8), (2, 2 / 9), (3, 3 / 10), (4, 3 / 11)],
        "reward/mean": [(1, 0.1), (2, 0.4), (3, 0.8999999999999999), (4, 1.2)],
        "tokens": [(1, 100.0), (2, 200.0), (3, 300.0), (4, 400.0)],
        "eval/acc": [(0, 0.25)],
    }
    assert expected(tmp_path, "wandb") == want
    # each store, as it shows the run, holds exactly metrics.jsonl (TensorBoard as float32)
    assert read_back(tmp_path, "tensorboard") == expected(tmp_path, "tensorboard")
    assert read_back(tmp_path, "wandb") == want
    # the undone points are still there (W&B cannot delete), before a redo marker at each redone step
    for sink in ("tensorboard", "wandb"):
        every = read_back(tmp_path, sink, keep_undone=True)
        assert [s for s, _ in every["loss"]] == [1, 2, 2, 3, 3, 3, 4]
        assert every["eval/acc"] == [(0, 0.25), (3, 0.5)]
    assert read_back(tmp_path, "wandb", keep_undone=True)["rlstack/redo_from"] == [(2, 2.0), (3, 3.0)]
    assert not list(tmp_path.glob("wandb_home/**/*.wandb"))  # run files under <run_dir>/wandb only


def test_mlflow_holds_what_metrics_jsonl_holds_and_resumes_its_run(tmp_path: Path) -> None:
    import mlflow  # noqa: F401  (a dependency of rlstack: a missing one fails here)
    from mlflow.tracking import MlflowClient

    cfg = LoggingConfig(sinks=["mlflow"], mlflow=MlflowConfig(experiment="exp"))
    _session_one(tmp_path, cfg)
    run_id = json.loads((tmp_path / RUNS_FILE).read_text())["mlflow"]["run_id"]
    _session_two(tmp_path, cfg)
    assert json.loads((tmp_path / RUNS_FILE).read_text())["mlflow"]["run_id"] == run_id

    assert read_back(tmp_path, "mlflow") == expected(tmp_path, "mlflow")
    assert expected(tmp_path, "mlflow")["loss"] == [(1, 1 / 8), (2, 2 / 9), (3, 3 / 10), (4, 3 / 11)]
    every = read_back(tmp_path, "mlflow", keep_undone=True)
    assert [s for s, _ in every["loss"]] == [1, 2, 2, 3, 3, 3, 4]
    assert every["rlstack/redo_from"] == [(2, 2.0), (3, 3.0)]
    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.lr"] == "1e-05"
    assert run.data.params["trainer.steps"] == "4"  # immutable: the resumed run's 5 is not logged
    assert run.data.params["rewards"] == '[{"name": "math"}]'
    assert run.data.params["model.path"] == "null"
    assert client.get_experiment(run.info.experiment_id).name == "exp"
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]


def test_scalars_params_and_keys() -> None:
    record = {"step": 3, "time": 1.5, "a": 1, "b": 2.5, "c": None, "d": float("nan"), "e": {"x": 1}, "f": "s"}
    assert scalars_of(record | {"g": True}) == {"a": 1.0, "b": 2.5, "g": 1.0}
    assert mlflow_key("reward/math[0]") == "reward/math_0_"
    assert mlflow_key("a//b") == "_a__b" and mlflow_key("/a") == "__a" and mlflow_key("") == "_"
    params = mlflow_params({"a": {"b": "x" * 600, "c": [1, 2]}, "d": {}})
    assert params == {"a.b": "x" * 497 + "...", "a.c": "[1, 2]", "d": "{}"}


def test_a_missing_package_fails_when_the_sink_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(SinkError, match=r"'wandb' but the wandb package does not import.*pip install 'wandb"):
        MetricsSink(tmp_path, LoggingConfig(sinks=["tensorboard", "wandb"]))
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(SinkError, match=r"'mlflow'.*pip install 'rlstack\[mlflow\]'"):
        MetricsSink(tmp_path, LoggingConfig(sinks=["mlflow"]))
    with pytest.raises(SinkError, match="tensorboard more than once"):
        MetricsSink(tmp_path, LoggingConfig(sinks=["tensorboard", "tensorboard"]))


def test_a_bad_mlflow_uri_fails_when_the_sink_opens(tmp_path: Path) -> None:
    import mlflow  # noqa: F401  (a dependency of rlstack: a missing one fails here)

    cfg = LoggingConfig(sinks=["tensorboard", "mlflow"], mlflow=MlflowConfig(tracking_uri="nosuch://host"))
    with pytest.raises(SinkError, match="metrics sink mlflow: could not start"):
        MetricsSink(tmp_path, cfg)


def test_a_failing_sink_is_named_after_the_record_is_kept(tmp_path: Path) -> None:
    sink = MetricsSink(tmp_path, LoggingConfig(sinks=["tensorboard"]))

    def broken(step: int, scalars: dict[str, float]) -> None:
        raise OSError("disk full")

    sink.sinks[0].log = broken  # type: ignore[method-assign]
    with pytest.raises(SinkError, match="metrics sink tensorboard failed at step 1: OSError: disk full"):
        sink.log(1, {"loss": 0.5})
    sink.close()
    assert read_metrics(tmp_path)[0]["loss"] == 0.5
