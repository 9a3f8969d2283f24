"""Training progress: a rich bar on a terminal; plain lines when stdout is not one.

A log file or `ray job logs` cannot show a redrawn bar: there, one line every `logging.progress_every_s`
seconds (and after the first and the last step) carries step, elapsed, ETA and the figures a user watches.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO

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
    "throughput/tokens_per_s": "tok/s",
    "time/step": "s/step",
}


def figures(metrics: dict[str, Any]) -> str:
    return "  ".join(
        f"{short} {metrics[key]:.3g}" for key, short in SHOWN.items() if isinstance(metrics.get(key), float)
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainProgress:
    """`with TrainProgress(total, start) as bar: ... bar.update(step, metrics)`."""

    def __init__(
        self,
        total: int,
        start: int,
        enabled: bool = True,
        every_s: float = 30.0,
        stream: TextIO | None = None,
        name: str = "train",
    ) -> None:
        self.enabled = enabled
        self.total, self.start, self.every_s, self.name = total, start, every_s, name
        self.stream = stream or sys.stdout
        self.plain = enabled and not self.stream.isatty()
        self.progress = Progress(
            TextColumn(f"[bold]{name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[figures]}"),
            disable=not enabled or self.plain,
        )
        self.task = self.progress.add_task(name, total=total, completed=start, figures="")
        self._started = time.monotonic()
        self._last_line: float | None = None

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        shown = figures(metrics)
        self.progress.update(self.task, completed=step, figures=shown)
        if not self.plain:
            return
        now = time.monotonic()
        due = self._last_line is None or now - self._last_line >= self.every_s or step >= self.total
        if due:
            self._last_line = now
            self.stream.write(self.line(step, now - self._started, shown) + "\n")
            self.stream.flush()

    def line(self, step: int, elapsed: float, shown: str) -> str:
        """`train step 12/100 (12%)  elapsed 0:03:10  eta 0:23:13  reward 0.41 ...`"""
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        pct = 100 * step / max(self.total, 1)
        eta_text = _duration(eta) if eta == eta else "?"
        return (
            f"{self.name} step {step}/{self.total} ({pct:.0f}%)  elapsed {_duration(elapsed)}  "
            f"eta {eta_text}  {shown}".rstrip()
        )

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
