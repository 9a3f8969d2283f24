"""Where step metrics go: `metrics.jsonl` (always; one JSON object per `log` call) and the sinks that
`logging.sinks` names (TensorBoard, W&B, MLflow: rlstack.monitor.sinks), which get each record's finite
scalars. Values are plain floats; the driver adds `step` and wall-clock time.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from rlstack.monitor.config import LoggingConfig
    from rlstack.monitor.sinks import Sink

EXPERT_LOAD = "expert_load.jsonl"
"""Per step, tokens per expert of every MoE layer: {"step": s, "load": {"<layer>": [count per expert]}}."""
LOAD_PREFIX = "moe/load/"
"""Metric keys `moe/load/<layer>/<expert>` (rlstack.learner.moe): the sink files them in EXPERT_LOAD, not
in metrics.jsonl nor the sinks (a 45-layer, 288-expert model would log 13k scalars a step)."""


class MetricsSink:
    """metrics.jsonl (one record per `log` call), the expert-load table of MoE runs, and the sinks of
    `logging.sinks` (rlstack.monitor.sinks; `logging` None = LoggingConfig() defaults: TensorBoard).

    Opening it again on the same `run_dir` continues: W&B and MLflow resume their runs, and what the sinks
    hold past the last step in metrics.jsonl (which the driver has truncated to the checkpoint) is undone;
    `truncate_metrics` on the directory of an open sink does the same (a learner restart): see
    rlstack.monitor.sinks, "Redone steps". A sink that fails raises `SinkError` naming it, after the
    record is in metrics.jsonl and the other sinks have it."""

    def __init__(
        self, run_dir: Path, logging: LoggingConfig | None = None, run_config: dict[str, Any] | None = None
    ) -> None:
        from rlstack.monitor.config import LoggingConfig
        from rlstack.monitor.sinks import open_sinks

        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.load_path = run_dir / EXPERT_LOAD
        last = _last_step(self.path)
        self.sinks = open_sinks(
            run_dir, logging or LoggingConfig(), run_config, 0 if last is None else last + 1
        )
        self._file = self.path.open("a")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        from rlstack.monitor.registry import check
        from rlstack.monitor.sinks import scalars_of

        check(metrics)  # every key is described in docs/metrics.md (strict in the tests)
        load = {k: v for k, v in metrics.items() if k.startswith(LOAD_PREFIX)}
        if load:
            metrics = {k: v for k, v in metrics.items() if k not in load}
            self._log_load(step, load)
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps every step it finished
        scalars = scalars_of(record)
        if scalars:
            self._each_sink(f"failed at step {step}", lambda sink: sink.log(step, scalars))

    def redo(self, step: int) -> None:
        """Steps from `step` on are redone (a learner restart; `truncate_metrics` has cut the run's files
        back to `step - 1`): each sink undoes or marks what it holds of them (rlstack.monitor.sinks)."""
        self._each_sink(f"failed to undo the steps from {step} on", lambda sink: sink.redo(step))

    def _each_sink(self, what: str, call: Callable[[Sink], None]) -> None:
        """`call` on every sink, even if one fails; then `SinkError` naming those that failed."""
        from rlstack.monitor.sinks import SinkError

        failures: list[tuple[str, Exception]] = []
        for sink in self.sinks:
            try:
                call(sink)
            except Exception as e:
                failures.append((sink.name, e))
        if failures:
            message = "; ".join(
                f"metrics sink {name} {what}: {type(e).__name__}: {e}" for name, e in failures
            )
            raise SinkError(message) from failures[0][1]

    def _log_load(self, step: int, load: dict[str, Any]) -> None:
        layers: dict[str, dict[int, float]] = {}
        for key, value in load.items():
            layer, expert = key[len(LOAD_PREFIX) :].split("/")
            layers.setdefault(layer, {})[int(expert)] = _plain(value)
        table = {layer: [row[e] for e in sorted(row)] for layer, row in layers.items()}
        with self.load_path.open("a") as f:
            f.write(json.dumps({"step": step, "load": table}) + "\n")

    def close(self) -> None:
        """Close metrics.jsonl and every sink (all of them, even if one fails: then `SinkError`)."""
        self._file.close()
        try:
            self._each_sink("failed to close", lambda sink: sink.close())
        finally:
            self.sinks = []


def _last_step(path: Path) -> int | None:
    """The step of the last complete record of metrics.jsonl (its last megabyte), None if there is none."""
    if not path.exists():
        return None
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - (1 << 20)))
        lines = f.read().splitlines()[1 if size > 1 << 20 else 0 :]  # the first may be cut in two
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a killed run
    return None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop the records of steps after `last_step` from every per-step file of the run (a resumed or
    restarted run rewrites the steps it redoes): metrics.jsonl, the expert-load table, and the samples
    (rlstack.monitor.samples: rollouts, log-ratio table, token files). An open MetricsSink is told apart:
    `MetricsSink.redo`."""
    from rlstack.monitor.samples import LOG_RATIO, ROLLOUTS, drop_token_files_after

    for path in (run_dir / "metrics.jsonl", run_dir / EXPERT_LOAD, run_dir / ROLLOUTS, run_dir / LOG_RATIO):
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            records = []
            for i, line in enumerate(lines):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    if i < len(lines) - 1:  # only the last line may be cut short (a killed run)
                        raise ValueError(f"{path}: line {i + 1} is not JSON") from None
            keep = [r for r in records if r["step"] <= last_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    drop_token_files_after(run_dir, last_step)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
