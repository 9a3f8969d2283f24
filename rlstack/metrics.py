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


class MetricsSink:
    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps every step it finished
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, float | int) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

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


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop records after `last_step` (a resumed run rewrites the steps it redoes)."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        keep = [r for r in read_metrics(run_dir) if r["step"] <= last_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
