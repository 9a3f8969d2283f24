"""Metrics files: a killed run keeps its steps, a resumed run rewrites what it redoes, every logged key is
registered (strict in the tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlstack.metrics import MetricsSink, read_metrics, truncate_metrics
from rlstack.monitor.config import LoggingConfig


def test_sink_and_truncate(tmp_path: Path) -> None:
    sink = MetricsSink(tmp_path, LoggingConfig(sinks=[]))
    for step in (1, 2, 3):
        sink.log(step, {"actor/loss": float(step), "reward/mean": float("nan")})
    sink.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert read_metrics(tmp_path)[0]["reward/mean"] is None  # JSON has no NaN

    truncate_metrics(tmp_path, last_step=2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_expert_health_goes_to_tensorboard_and_loads_to_their_own_table(tmp_path: Path) -> None:
    """MoE runs: per-layer health scalars reach metrics.jsonl and TensorBoard; the per-expert loads go to
    expert_load.jsonl only (rewritten like metrics.jsonl on resume)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = MetricsSink(tmp_path, LoggingConfig(sinks=["tensorboard"]))
    for step in (1, 2):
        loads = {f"moe/load/{layer}/{e}": float(step * 10 + e) for layer in (1, 3) for e in range(4)}
        sink.log(step, {"moe/layer1/max_violation": 0.5 * step, **loads})
    sink.close()
    records = read_metrics(tmp_path)
    assert [r["moe/layer1/max_violation"] for r in records] == [0.5, 1.0]
    assert not any(k.startswith("moe/load/") for r in records for k in r)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "moe/layer1/max_violation" in events.Tags()["scalars"]
    assert not any(t.startswith("moe/load/") for t in events.Tags()["scalars"])
    table = (tmp_path / "expert_load.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in table][1] == {
        "step": 2,
        "load": {"1": [20, 21, 22, 23], "3": [20, 21, 22, 23]},
    }
    truncate_metrics(tmp_path, last_step=1)
    assert len((tmp_path / "expert_load.jsonl").read_text().splitlines()) == 1


def test_an_unregistered_metric_fails_in_strict_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = MetricsSink(tmp_path, LoggingConfig(sinks=[]))
    monkeypatch.setenv("RLSTACK_STRICT_METRICS", "1")
    with pytest.raises(ValueError, match=r"unregistered metric key.*actor/made_up"):
        sink.log(1, {"actor/loss": 1.0, "actor/made_up": 2.0})
    monkeypatch.setenv("RLSTACK_STRICT_METRICS", "0")
    sink.log(1, {"actor/loss": 1.0, "actor/made_up": 2.0})  # a plugin's own metric: logged, with a warning
    sink.close()
    assert read_metrics(tmp_path)[-1]["actor/made_up"] == 2.0
