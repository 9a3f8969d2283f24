"""Read a run's metric sinks back with the real libraries, to compare them with metrics.jsonl.

    from sink_readback import expected, read_back   # tests/ is on sys.path (tests/conftest.py)
    assert read_back(run_dir, "wandb") == expected(run_dir, "wandb")

Both give {metric: [(step, value), ...]} sorted by step (stable: a step's points stay in logging order).
`expected` derives it from metrics.jsonl as the sink stores it: the same finite scalars
(rlstack.monitor.sinks.scalars_of), float32 for TensorBoard, MLflow-safe keys for MLflow.
`read_back` gives what the store shows as current: the points undone by a redo (rlstack.monitor.sinks,
"Redone steps") are left out, as in metrics.jsonl; `keep_undone=True` gives every point the store holds
(for W&B and MLflow, the `rlstack/redo_from` markers too).

- tensorboard: tensorboard's EventAccumulator on `<run_dir>/tb` (every point kept, purged steps hidden).
- wandb: the history records of the run's `.wandb` transaction logs, `<run_dir>/wandb/*-<id>/run-<id>.wandb`
  (one per session of the run, read in start-time order; offline and online runs both write them). The
  file is a LevelDB-style log of `wandb_internal_pb2.Record` protobufs; wandb 0.31 ships no Python reader,
  so `wandb_records` parses it (the format of the former `wandb.sdk.internal.datastore`). The x value is
  the `step` metric (rlstack.monitor.sinks.WANDB_STEP).
- mlflow: MlflowClient(tracking_uri).get_metric_history for the run id in `<run_dir>/sink_runs.json`.

Undone points: TensorBoard purges them itself (EventAccumulator's purge_orphaned_data). W&B and MLflow
hold them; reading their points in logging order, a `rlstack/redo_from` point at step s drops every point
of a step >= s read before it (MLflow: logging order = timestamp order, which the sink keeps strictly
increasing across batches).
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rlstack.metrics import read_metrics
from rlstack.monitor.sinks import (
    REDO_METRIC,
    WANDB_STEP,
    mlflow_key,
    mlflow_tracking_uri,
    read_runs_file,
    scalars_of,
)

Points = dict[str, list[tuple[int, float]]]


def read_back(run_dir: str | Path, sink: str, keep_undone: bool = False) -> Points:
    """What `sink` holds of the run in `run_dir`: metric -> [(step, value)], sorted by step."""
    run_dir = Path(run_dir)
    if sink == "tensorboard":
        return _sorted(_tensorboard(run_dir, purge=not keep_undone))
    stream = {"wandb": _wandb, "mlflow": _mlflow}[sink](run_dir)
    points: Points = {}
    for key, step, value in stream:
        if key == REDO_METRIC and not keep_undone:
            points = {k: [p for p in pts if p[0] < step] for k, pts in points.items()}
        else:
            points.setdefault(key, []).append((step, value))
    return _sorted({k: pts for k, pts in points.items() if pts})


def expected(run_dir: str | Path, sink: str) -> Points:
    """What `sink` should hold according to metrics.jsonl (in the form `read_back` returns)."""
    points: Points = {}
    for record in read_metrics(run_dir):
        for key, value in scalars_of(record).items():
            if sink == "tensorboard":
                value = float(np.float32(value))
            points.setdefault(mlflow_key(key) if sink == "mlflow" else key, []).append(
                (record["step"], value)
            )
    return _sorted(points)


def _sorted(points: Points) -> Points:
    return {key: sorted(pts, key=lambda p: p[0]) for key, pts in sorted(points.items())}


def _tensorboard(run_dir: Path, purge: bool) -> Points:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    # size_guidance 0: every point (the default samples 10,000 per tag)
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={SCALARS: 0}, purge_orphaned_data=purge)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()[SCALARS]}


def wandb_run_files(run_dir: Path) -> list[Path]:
    """The `.wandb` files of the run id in sink_runs.json, oldest session first."""
    run_id = read_runs_file(run_dir)["wandb"]["id"]
    files = (run_dir / "wandb").glob(f"*-{run_id}/run-{run_id}.wandb")
    stamp = re.compile(r"(\d{8}_\d{6})")
    return sorted(files, key=lambda p: m.group(1) if (m := stamp.search(p.parent.name)) else "")


def _wandb(run_dir: Path) -> Iterator[tuple[str, int, float]]:
    """(metric, step, value) of the run's history rows, in logging order."""
    from wandb.proto import wandb_internal_pb2

    for path in wandb_run_files(run_dir):
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") != "history":
                continue
            row = {
                item.key or ".".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            step = int(row.pop(WANDB_STEP))
            for key, value in row.items():
                if not key.startswith("_"):  # _step, _runtime, _timestamp: W&B's own
                    yield key, step, float(value)


_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a `.wandb` file: a 7-byte header (`:W&B`, 0xBEE1, version 0), then 32 KiB blocks of
    chunks (crc32 of type+data, length, type FULL/FIRST/MIDDLE/LAST, data); a chunk header never straddles
    a block (the block's tail is zero padding). A chunk cut short at the end (a killed run) ends it."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B transaction log (header {ident!r} {magic:#x} {version})")
    pos, parts = _HEADER, b""
    while True:
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        if pos + _HEADER > len(data):
            return
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # padding
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if len(chunk) < length:
            return
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = chunk
        elif kind == _MIDDLE:
            parts += chunk
        elif kind == _LAST:
            yield parts + chunk
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")


def _mlflow(run_dir: Path) -> Iterator[tuple[str, int, float]]:
    """(metric, step, value) of the run's metric histories, merged in timestamp (= logging) order."""
    from mlflow.tracking import MlflowClient

    entry = read_runs_file(run_dir)["mlflow"]
    uri = mlflow_tracking_uri(run_dir, entry["tracking_uri"])
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # what the sink sets for its file store
    client = MlflowClient(tracking_uri=uri)
    run_id = entry["run_id"]
    merged = [
        (m.timestamp, key, m.step, m.value)
        for key in client.get_run(run_id).data.metrics
        for m in client.get_metric_history(run_id, key)
    ]
    merged.sort(key=lambda m: m[0])  # stable: a metric's points of one timestamp keep their order
    for _, key, step, value in merged:
        yield key, step, value
