"""Metrics files: a killed run keeps its steps, a resumed run rewrites what it redoes, a fresh run in a
used directory moves the old files aside instead of mixing or deleting them."""

from __future__ import annotations

from pathlib import Path

from rlstack.metrics import MetricsSink, archive_previous_run, read_metrics, truncate_metrics


def test_sink_truncate_and_archive(tmp_path: Path) -> None:
    sink = MetricsSink(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        sink.log(step, {"loss": float(step), "nan": float("nan")})
    sink.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert read_metrics(tmp_path)[0]["nan"] is None  # JSON has no NaN

    truncate_metrics(tmp_path, last_step=2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]

    archive_previous_run([tmp_path / "metrics.jsonl", tmp_path / "absent.jsonl"])
    assert not (tmp_path / "metrics.jsonl").exists()
    archived = list(tmp_path.glob("metrics.*.jsonl"))
    assert len(archived) == 1 and len(archived[0].read_text().splitlines()) == 2
