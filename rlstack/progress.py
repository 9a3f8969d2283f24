"""A rich progress bar for training: step, ETA and the figures a user watches."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

SHOWN = {
    "sft/nll": "nll",
    "reward/mean": "reward",
    "reward/accuracy": "acc",
    "filter/combined_accept": "accept",
    "staleness/mean": "stale",
    "time/step": "s/step",
}


class TrainProgress:
    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[figures]}"),
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, figures="")

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        figures = "  ".join(
            f"{short} {metrics[key]:.3g}"
            for key, short in SHOWN.items()
            if isinstance(metrics.get(key), float)
        )
        self.progress.update(self.task, completed=step, figures=figures)

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.progress.__exit__(exc_type, exc, traceback)
