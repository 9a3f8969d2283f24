"""Metric sinks besides `metrics.jsonl`: TensorBoard, Weights & Biases and MLflow (`logging.sinks`).

`rlstack.metrics.MetricsSink` writes each record to `metrics.jsonl` first, then hands every sink its finite
int/float values (`scalars_of`: not `step`, `time`, nulls or nested values such as `placement`) in one
call per record. A sink whose package is missing, or whose store cannot be opened, fails when the sink
is built (`SinkError`, naming the sink and the install command); a sink that fails later raises
`SinkError` naming it: nothing is dropped silently.

Where each writes, and what a resumed run (the same run directory opened again) does:

- `tensorboard`: event files under `<run_dir>/tb/`, as float32 (TensorBoard's scalar type).
- `wandb`: the run under `<run_dir>/wandb/` (offline by default: `wandb sync <run_dir>/wandb/offline-run-*`
  uploads it later). The run config is the W&B config. Its id is kept in `<run_dir>/sink_runs.json`, so a
  resumed run continues the same W&B run (`resume="allow"`; offline, each session is its own
  `offline-run-*` directory with that id, which `wandb sync` uploads in order).
- `mlflow`: `logging.mlflow.tracking_uri`, or a file store at `<run_dir>/mlruns` (MLflow 3 keeps its file
  store in maintenance mode behind `MLFLOW_ALLOW_FILE_STORE`, which this sink sets for file stores unless
  it is set already). The run id is kept in `sink_runs.json` too; the flattened run config goes to the
  run's params (values cut to `PARAM_VALUE_MAX` characters, keys made MLflow-safe by `mlflow_key`).

Redone steps. A resumed run, or a learner restart, redoes the steps after its checkpoint: `truncate_metrics`
cuts metrics.jsonl back to the checkpoint and the open MetricsSink calls `redo(first redone step)` on each
sink (a resumed MetricsSink does so when it opens, from the last step left in metrics.jsonl). Then

- TensorBoard hides the undone values itself: the writer starts again with `purge_step` = that step, and
  TensorBoard drops every event at or after it written before.
- W&B cannot delete points and rejects a `step=` lower than one already logged, so rlstack never passes
  one: each record is logged with the step as the metric `step`, and `define_metric("*",
  step_metric="step")` makes it every chart's x axis (W&B's own `_step` only counts rows). Nothing is
  rejected or dropped: a redone step shows as a second point at the same x.
- MLflow keeps both points as well.

W&B and MLflow also get a `rlstack/redo_from` point at the redone step (value = that step), so their
charts mark where steps were redone, and a reader can drop the undone points (tests/sink_readback.py).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import posixpath
import re
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from rlstack.monitor.config import LoggingConfig, MlflowConfig, SinkName, WandbConfig

logger = logging.getLogger(__name__)

RUNS_FILE = "sink_runs.json"
"""`<run_dir>/sink_runs.json`: the W&B and MLflow run ids, so that a resumed run continues the same runs."""
WANDB_STEP = "step"
"""The W&B metric that carries rlstack's step (the x axis of every W&B chart)."""
REDO_METRIC = "rlstack/redo_from"
"""W&B and MLflow: a point at step s (value s) says the steps from s on were redone: the points of steps
>= s logged before it are undone (metrics.jsonl no longer has them)."""
PARAM_VALUE_MAX = 500
"""MLflow param values are cut to this many characters (MLflow's own limit is 6000; some older servers
and databases allow 500)."""
INSTALL = {
    "tensorboard": "pip install 'tensorboard>=2.21,<3'",
    "wandb": "pip install 'wandb>=0.31,<0.32'",
    "mlflow": "pip install 'rlstack[mlflow]' (or: pip install 'mlflow-skinny>=3.18,<4')",
}


class SinkError(RuntimeError):
    """A metrics sink could not be opened or failed to log; the message names the sink."""


class Sink(Protocol):
    name: SinkName

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Log one record's scalars at `step`, in one call to the backend."""

    def redo(self, step: int) -> None:
        """The steps from `step` on are redone (metrics.jsonl was cut back to `step - 1`)."""

    def close(self) -> None:
        """Flush and finish the run."""


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The values a sink gets from a metrics record: finite ints and floats (bools as 0/1), as floats;
    not `step`, `time`, nulls, strings or nested values."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in ("step", "time") and isinstance(value, int | float) and math.isfinite(value)
    }


def open_sinks(
    run_dir: Path, logging_cfg: LoggingConfig, run_config: dict[str, Any] | None = None, purge_from: int = 0
) -> list[Sink]:
    """The sinks `logging_cfg.sinks` names, opened on `run_dir`. `purge_from`: the first step this session
    may log (metrics.jsonl's last step + 1, else 0): what an earlier session logged at or after it is
    undone (`redo`). If one sink fails to open, those opened before it are closed and `SinkError` is
    raised."""
    twice = sorted({s for s in logging_cfg.sinks if logging_cfg.sinks.count(s) > 1})
    if twice:
        raise SinkError(f"logging.sinks lists {', '.join(twice)} more than once")
    sinks: list[Sink] = []
    try:
        for name in logging_cfg.sinks:
            try:
                if name == "tensorboard":
                    sinks.append(TensorBoardSink(run_dir, purge_from))
                elif name == "wandb":
                    sinks.append(WandbSink(run_dir, logging_cfg.wandb, run_config, purge_from))
                elif name == "mlflow":
                    sinks.append(MlflowSink(run_dir, logging_cfg.mlflow, run_config, purge_from))
                else:  # pragma: no cover - LoggingConfig validates the names
                    raise ValueError(f"unknown sink {name!r}")
            except SinkError:
                raise
            except Exception as e:
                raise SinkError(f"metrics sink {name}: could not start: {type(e).__name__}: {e}") from e
    except BaseException:
        for sink in reversed(sinks):
            try:
                sink.close()
            except Exception:
                logger.exception("metrics sink %s: close after a failed start", sink.name)
        raise
    return sinks


class TensorBoardSink:
    """Event files under `<run_dir>/tb/` (torch's SummaryWriter)."""

    name: SinkName = "tensorboard"

    def __init__(self, run_dir: Path, purge_from: int = 0) -> None:
        _import(self.name, "tensorboard")
        self._dir = run_dir / "tb"
        self._writer = self._open(purge_from)

    def _open(self, purge_step: int) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self._dir), purge_step=purge_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def redo(self, step: int) -> None:
        self._writer.close()
        self._writer = self._open(step)

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """A W&B run under `<run_dir>/wandb/` (offline by default); resumed from `sink_runs.json`."""

    name: SinkName = "wandb"

    def __init__(
        self, run_dir: Path, cfg: WandbConfig, run_config: dict[str, Any] | None = None, purge_from: int = 0
    ) -> None:
        self._wandb = wandb = _import(self.name, "wandb")
        state = _RunsFile(run_dir)
        run_id = state.get(self.name).get("id")  # None: W&B picks one, kept below
        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_dir.resolve().name,
            mode=cfg.mode,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            config=run_config,
            allow_val_change=True,  # a resumed run may change settings (e.g. trainer.steps)
            reinit="create_new",  # never take over or finish another run of this process
            settings=wandb.Settings(console="off"),  # rlstack's own logs and progress bar stay as they are
        )
        try:
            state.put(self.name, {"id": self._run.id})
            self._run.define_metric(WANDB_STEP)
            self._run.define_metric("*", step_metric=WANDB_STEP)
            if run_id is not None:  # a resumed run: undo what the last session logged past metrics.jsonl
                self.redo(purge_from)
        except BaseException:
            self.close()
            raise

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log({**scalars, WANDB_STEP: step})  # no step=: see the module docstring

    def redo(self, step: int) -> None:
        self._run.log({WANDB_STEP: step, REDO_METRIC: step})

    def close(self) -> None:
        self._run.finish()
        if self._wandb.run is None:  # no other global run in this process: stop wandb-core now
            self._wandb.teardown()


class MlflowSink:
    """An MLflow run (a file store at `<run_dir>/mlruns` unless `tracking_uri` is set); resumed from
    `sink_runs.json`; the flattened run config as its params."""

    name: SinkName = "mlflow"

    def __init__(
        self, run_dir: Path, cfg: MlflowConfig, run_config: dict[str, Any] | None = None, purge_from: int = 0
    ) -> None:
        _import(self.name, "mlflow")
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        self._last_ms = 0  # timestamps strictly increase, so a history merged across metrics keeps its order
        self.tracking_uri = mlflow_tracking_uri(run_dir, cfg.tracking_uri)
        if urlparse(self.tracking_uri).scheme in ("", "file"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = client = MlflowClient(tracking_uri=self.tracking_uri)
        state = _RunsFile(run_dir)
        previous = state.get(self.name)
        resumed: str | None = None
        if previous.get("run_id") and previous.get("tracking_uri") == cfg.tracking_uri:
            try:
                run = client.get_run(previous["run_id"])
            except MlflowException as e:
                logger.warning(
                    "mlflow: run %s not found at %s (%s); starting a new run",
                    previous["run_id"],
                    self.tracking_uri,
                    e,
                )
            else:
                if run.info.lifecycle_stage == "active":
                    resumed = run.info.run_id
                    client.update_run(resumed, status="RUNNING")
                else:
                    logger.warning("mlflow: run %s was deleted; starting a new run", run.info.run_id)
        self.run_id: str = resumed or self._create_run(cfg, run_dir)
        if resumed:  # a resumed run: undo what the last session logged past metrics.jsonl
            self.redo(purge_from)
        state.put(self.name, {"run_id": self.run_id, "tracking_uri": cfg.tracking_uri})
        if run_config:
            self._log_params(run_config)

    def _create_run(self, cfg: MlflowConfig, run_dir: Path) -> str:
        experiment = self._client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            experiment_id = self._client.create_experiment(cfg.experiment)
        elif experiment.lifecycle_stage != "active":
            raise SinkError(
                f"metrics sink mlflow: experiment {cfg.experiment!r} at {self.tracking_uri} is deleted; "
                "restore it (`mlflow experiments restore`) or set logging.mlflow.experiment to another name"
            )
        else:
            experiment_id = experiment.experiment_id
        tags = {"rlstack.run_dir": str(run_dir.resolve())}
        run = self._client.create_run(
            experiment_id, run_name=cfg.run_name or run_dir.resolve().name, tags=tags
        )
        return str(run.info.run_id)

    def _log_params(self, run_config: dict[str, Any]) -> None:
        """New params only: MLflow's params are immutable, so a resumed run whose config changed keeps the
        first values (and says which differ)."""
        from mlflow.entities import Param

        params = mlflow_params(run_config)
        have = self._client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
        if changed:
            listed = ", ".join(changed[:20]) + (" ..." if len(changed) > 20 else "")
            logger.warning(
                "mlflow: params are immutable; run %s keeps its first values of %s", self.run_id, listed
            )
        new = [Param(k, v) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):  # MLflow: at most 100 params a batch
            self._client.log_batch(self.run_id, params=new[i : i + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._last_ms = now = max(int(time.time() * 1000), self._last_ms + 1)
        metrics = [self._metric(mlflow_key(k), v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow: at most 1000 metrics a batch
            self._client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def redo(self, step: int) -> None:
        self.log(step, {REDO_METRIC: float(step)})

    def close(self) -> None:
        self._client.set_terminated(self.run_id, "FINISHED")


def mlflow_tracking_uri(run_dir: Path, configured: str | None) -> str:
    """`configured`, or the file store `file:///<absolute run_dir>/mlruns`."""
    return configured or (run_dir.resolve() / "mlruns").as_uri()


def mlflow_key(key: str) -> str:
    """`key` as MLflow accepts it: characters other than letters, digits, `_ - . / : ` and space become
    `_`; a name that is not a plain relative path (`a//b`, `../a`, `/a`) loses its slashes."""
    safe = re.sub(r"[^/\w.\- :]", "_", key)[:250] or "_"
    norm = posixpath.normpath(safe)
    if norm != safe or norm == "." or norm.startswith(("..", "/")):
        safe = "_" + safe.replace("/", "_")
    return safe


def mlflow_params(run_config: dict[str, Any]) -> dict[str, str]:
    """The run config flattened to `a.b.c` keys: strings as they are, other values as JSON, each cut to
    `PARAM_VALUE_MAX` characters."""
    flat: dict[str, str] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
                continue
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            if len(text) > PARAM_VALUE_MAX:
                text = text[: PARAM_VALUE_MAX - 3] + "..."
            flat[mlflow_key(f"{prefix}{key}")] = text

    walk(run_config, "")
    return flat


def read_runs_file(run_dir: Path) -> dict[str, dict[str, Any]]:
    """`sink_runs.json` of `run_dir`: {"wandb": {"id"}, "mlflow": {"run_id", "tracking_uri"}}, or {}."""
    path = run_dir / RUNS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


class _RunsFile:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / RUNS_FILE

    def get(self, sink: str) -> dict[str, Any]:
        return dict(read_runs_file(self.path.parent).get(sink, {}))

    def put(self, sink: str, entry: dict[str, Any]) -> None:
        data = read_runs_file(self.path.parent) | {sink: entry}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.path)


def _import(sink: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SinkError(
            f"logging.sinks lists {sink!r} but the {module} package does not import ({e}); "
            f"install it: {INSTALL[sink]}"
        ) from e
