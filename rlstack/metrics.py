"""Where step metrics go: `metrics.jsonl` (one JSON object per step) and TensorBoard (`tb/`).

Values are plain floats; the driver adds `step` and wall-clock time. W&B / MLflow sinks come with the
dashboards issue and plug in beside these two.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

EXPERT_LOAD = "expert_load.jsonl"
"""Per step, tokens per expert of every MoE layer: {"step": s, "load": {"<layer>": [count per expert]}}."""
LOAD_PREFIX = "moe/load/"
"""Metric keys `moe/load/<layer>/<expert>` (rlstack.learner.moe): the sink files them in EXPERT_LOAD, not
in metrics.jsonl and TensorBoard (a 45-layer, 288-expert model would log 13k scalars a step)."""


class MetricsSink:
    """metrics.jsonl (one record per step), TensorBoard, and the expert-load table of MoE runs."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.load_path = run_dir / EXPERT_LOAD
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        load = {k: v for k, v in metrics.items() if k.startswith(LOAD_PREFIX)}
        if load:
            metrics = {k: v for k, v in metrics.items() if k not in load}
            self._log_load(step, load)
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps every step it finished
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, float | int) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def _log_load(self, step: int, load: dict[str, Any]) -> None:
        layers: dict[str, dict[int, float]] = {}
        for key, value in load.items():
            layer, expert = key[len(LOAD_PREFIX) :].split("/")
            layers.setdefault(layer, {})[int(expert)] = _plain(value)
        table = {layer: [row[e] for e in sorted(row)] for layer, row in layers.items()}
        with self.load_path.open("a") as f:
            f.write(json.dumps({"step": step, "load": table}) + "\n")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def archive_previous_run(paths: list[Path]) -> None:
    """A fresh run in a used run directory: move the old run's files aside (`name.<time>.ext`), never
    mixing two runs in one file and never deleting what a run produced."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in paths:
        if path.exists():
            path.rename(path.with_name(f"{path.stem}.{stamp}{path.suffix}"))


SAMPLES = Path("samples") / "rollouts.jsonl"
"""Per step, one record per rollout (the driver's `_save_samples`)."""


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop the records of steps after `last_step` from metrics.jsonl, the expert-load table and the
    samples (a resumed or restarted run rewrites the steps it redoes)."""
    for path in (run_dir / "metrics.jsonl", run_dir / EXPERT_LOAD, run_dir / SAMPLES):
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


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
