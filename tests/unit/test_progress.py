"""Progress output: plain lines when stdout is not a terminal (a log file, `ray job logs`)."""

from __future__ import annotations

import io

from rlstack.progress import TrainProgress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    metrics = {
        "reward/mean": 0.5,
        "reward/accuracy": 0.25,
        "filter/combined_accept": 0.9,
        "staleness/mean": 1.0,
        "throughput/tokens_per_s": 123.0,
        "time/step": 2.0,
    }
    with TrainProgress(total=10, start=2, every_s=3600, stream=out) as bar:
        for step in range(3, 11):
            bar.update(step, metrics)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first step, then nothing for an hour... except the last step
    first, last = lines
    assert first.startswith("train step 3/10 (30%)  elapsed 0:00:00  eta ")
    for shown in ("reward 0.5", "acc 0.25", "accept 0.9", "stale 1", "tok/s 123", "s/step 2"):
        assert shown in first
    assert last.startswith("train step 10/10 (100%)") and "eta 0:00:00" in last


def test_every_update_prints_when_the_interval_is_short() -> None:
    out = io.StringIO()
    with TrainProgress(total=3, start=0, every_s=1e-9, stream=out, name="sft") as bar:
        for step in (1, 2, 3):
            bar.update(step, {"sft/nll": 1.5})
    assert [line.split("  ")[0] for line in out.getvalue().splitlines()] == [
        "sft step 1/3 (33%)",
        "sft step 2/3 (67%)",
        "sft step 3/3 (100%)",
    ]


def test_no_plain_lines_on_a_terminal_or_when_disabled() -> None:
    tty = _Tty()
    with TrainProgress(total=2, start=0, every_s=0.0, stream=tty) as bar:
        bar.update(1, {})
    assert tty.getvalue() == "" and not bar.plain  # the rich bar draws instead
    plain = io.StringIO()
    with TrainProgress(total=2, start=0, every_s=0.0, stream=plain, enabled=False) as bar:
        bar.update(1, {})
    assert plain.getvalue() == ""
