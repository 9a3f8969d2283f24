"""Run directories -> the report's one JSON payload (stdlib, pyyaml and, for token samples, pyarrow).

Files are read tolerantly: a missing file leaves its part of the payload None (the page's panel says so);
a last JSONL line cut short (a run that crashed or is writing) is skipped with a warning; a bad line
anywhere else raises ReportError naming the file and line.

Payload (schema 1):
    {"schema": 1, "generated": unix_s, "signature": str, "runs": [run, ...]}
    run = {
      "name", "path", "warnings": [str], "files": {name: bool},
      "config": {"summary": [[label, value], ...], "text": yaml} | None,
      "steps_done": int | None, "last_update": unix_s | None,
      "metrics": {key: {"x": [step, ...], "y": [float | None, ...]}},   # scalars; one point per step
      "expert_load": {"steps": [s, ...], "layers": {layer: [[tokens per expert] per step]}} | None,
      "log_ratio": [{"step": s, "by_version": {v: {"tokens", "mean", "q": {p: value}}}}] | None,
      "staleness": {"source": "rollouts" | "metrics", "counts": {s: n}, "dropped": n} | None,
      "rollouts": {step: [record, ...]} | None,  # samples/rollouts.jsonl: texts capped, "sample" filled,
                                                  # "prompt" left out where it is prompts[prompt_id]
      "prompts": {prompt_id: text},
      "tokens": {step: {sample: trajectory}} | None,  # samples/tokens/*.parquet
    }
    trajectory = {"prompt_id", "reward", "traj_accepted", "staleness", "ids", "text", "rollout_logp" (4
                  decimals), "log_ratio" (train - rollout log-prob, 3 significant digits; None off the loss),
                  "flags" (bit 1 trainable, 2 tool, 4 token_accepted), "version", "advantage"}
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rlstack.metrics import EXPERT_LOAD
from rlstack.monitor.samples import LOG_RATIO, ROLLOUTS, TOKENS, token_files

SCHEMA = 1
METRICS = "metrics.jsonl"
CONFIG = "config.resolved.yaml"
PLACEMENT = "placement.json"
WATCHED = (METRICS, EXPERT_LOAD, LOG_RATIO, ROLLOUTS, CONFIG, PLACEMENT)
"""Files whose change rebuilds the dashboard's payload (besides the token files)."""

MAX_TOKENS = 200_000
"""Default budget of per-token samples in one payload (about 50 bytes of JSON per token)."""
MAX_ROLLOUTS = 10_000
"""Default budget of rollout records in one payload."""
MAX_TEXT = 4_000
"""Prompt and response texts longer than this are cut in the payload."""
FLAG_TRAINABLE, FLAG_TOOL, FLAG_ACCEPTED = 1, 2, 4


class ReportError(ValueError):
    """A run directory that cannot be reported: missing, or a file with a bad line (file and line named)."""


def build_payload(
    run_dirs: Sequence[str | Path], max_tokens: int = MAX_TOKENS, max_rollouts: int = MAX_ROLLOUTS
) -> dict[str, Any]:
    """The report's payload for `run_dirs` (one run, or several overlaid)."""
    return PayloadBuilder(run_dirs, max_tokens, max_rollouts).build()


class PayloadBuilder:
    """Builds payloads of fixed run directories, again and again (the dashboard): parquet files already
    read are kept while their size and mtime stay the same."""

    def __init__(
        self, run_dirs: Sequence[str | Path], max_tokens: int = MAX_TOKENS, max_rollouts: int = MAX_ROLLOUTS
    ) -> None:
        if not run_dirs:
            raise ReportError("no run directory given")
        self.run_dirs = [Path(d) for d in run_dirs]
        for d in self.run_dirs:
            if not d.is_dir():
                raise ReportError(f"{d}: no such run directory")
        self.names = run_names(self.run_dirs)
        self.max_tokens = max_tokens
        self.max_rollouts = max_rollouts
        self._parquet: dict[Path, tuple[tuple[int, int], Any, dict[int, dict[str, Any]] | None]] = {}
        """path -> (size and mtime, its arrow table, its trajectories once converted)"""

    def signature(self) -> str:
        """Changes whenever a file the payload is built from changes (size or mtime): cheap, stats only."""
        h = hashlib.sha1()
        for d in self.run_dirs:
            for path in [*(d / name for name in WATCHED), *token_files(d).values()]:
                h.update(f"{path}:{_stat_key(path)};".encode())
        return h.hexdigest()[:16]

    def build(self) -> dict[str, Any]:
        signature = self.signature()
        runs = [self._run(d, name) for d, name in zip(self.run_dirs, self.names, strict=True)]
        return {"schema": SCHEMA, "generated": time.time(), "signature": signature, "runs": runs}

    def _run(self, run_dir: Path, name: str) -> dict[str, Any]:
        warnings: list[str] = []
        files = {str(f): (run_dir / f).exists() for f in (*WATCHED, TOKENS)}
        if not any(files.values()):
            raise ReportError(f"{run_dir}: not a run directory (none of {', '.join(files)} is there)")
        records = read_jsonl(run_dir / METRICS, warnings)
        metrics = metric_series(records) if records is not None else {}
        steps = [r["step"] for r in records or []]
        times = [r["time"] for r in records or [] if _is_number(r.get("time"))]
        rollouts = read_jsonl(run_dir / ROLLOUTS, warnings)
        prompts: dict[str, str] = {}
        return {
            "name": name,
            "path": str(run_dir.resolve()),
            "warnings": warnings,
            "files": files,
            "config": read_config(run_dir / CONFIG, warnings),
            "steps_done": max(steps) if steps else None,
            "last_update": max(times) if times else _mtime(run_dir / METRICS),
            "metrics": metrics,
            "expert_load": expert_load(read_jsonl(run_dir / EXPERT_LOAD, warnings)),
            "log_ratio": log_ratio(read_jsonl(run_dir / LOG_RATIO, warnings)),
            "staleness": staleness_counts(rollouts, metrics),
            "rollouts": rollout_records(rollouts, self.max_rollouts, warnings, prompts),
            "prompts": prompts,
            "tokens": self._tokens(run_dir, warnings),
        }

    def _tokens(self, run_dir: Path, warnings: list[str]) -> dict[str, dict[str, Any]] | None:
        files = token_files(run_dir)
        if not files:
            return None
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            warnings.append(f"{TOKENS}: pyarrow is not installed, so the per-token samples are not shown")
            return None
        sizes = {step: self._read(path, warnings)[0] for step, path in files.items()}
        keep = spread(list(files), sizes, self.max_tokens)
        if len(keep) < len(files):
            warnings.append(
                f"{TOKENS}: the per-token samples of {len(files) - len(keep)} of {len(files)} steps "
                f"are left out (budget {self.max_tokens:,} tokens; --max-tokens raises it)"
            )
        out = {}
        for step in keep:
            trajectories = self._read(files[step], warnings, rows=True)[1]
            if trajectories:
                out[str(step)] = {str(sample): t for sample, t in trajectories.items()}
        return out

    def _read(
        self, path: Path, warnings: list[str], rows: bool = False
    ) -> tuple[int, dict[int, dict[str, Any]] | None]:
        """(tokens in the file, its trajectories by sample if `rows`), cached while the file is unchanged;
        an unreadable file (e.g. deleted by the writer's thinning meanwhile) is skipped with a warning."""
        key = _stat_key(path)
        cached = self._parquet.get(path)
        if cached is None or cached[0] != key:
            cached = (key, None, None)
        _, table, trajectories = cached
        try:
            if table is None:
                import pyarrow.parquet as pq

                table = pq.read_table(path)
            if rows and trajectories is None:
                trajectories = {int(row["sample"]): trajectory(row) for row in table.to_pylist()}
        except Exception as e:
            warnings.append(f"{TOKENS}/{path.name}: not readable ({type(e).__name__}: {e}); skipped")
            return 0, None
        self._parquet[path] = (key, table, trajectories)
        return _list_total(table, "token_ids"), trajectories


def run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Directory names; where two are the same, their parent directory's name is put before them."""
    names = [d.resolve().name or str(d) for d in run_dirs]
    counts = Counter(names)
    names = [
        f"{d.resolve().parent.name}/{n}" if counts[n] > 1 else n for d, n in zip(run_dirs, names, strict=True)
    ]
    seen: Counter[str] = Counter()
    out = []
    for n in names:
        seen[n] += 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def read_jsonl(path: Path, warnings: list[str]) -> list[dict[str, Any]] | None:
    """The records of a JSONL file (None when it is missing). Only the last line may be cut short (a run
    that crashed or is writing): it is skipped with a warning; a bad line elsewhere raises ReportError."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                cut = "the last line was cut short (the run crashed or is writing); it was skipped"
                warnings.append(f"{_rel(path)}: {cut}")
                continue
            raise ReportError(f"{path}: line {i + 1} is not JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ReportError(f"{path}: line {i + 1} is not a JSON object with an integer 'step'")
        records.append(record)
    return records


def metric_series(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    """Scalar metrics by key, each one point per step in step order; several records of one step merge
    (a key logged twice at a step: the last value); null (non-finite) stays null; non-scalars are left out."""
    by_key: dict[str, dict[int, float | None]] = {}
    for record in records:
        step = record["step"]
        for key, value in record.items():
            if key in ("step", "time") or not (value is None or _is_number(value)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            by_key.setdefault(key, {})[step] = value
    return {
        key: {"x": sorted(points), "y": [points[s] for s in sorted(points)]}
        for key, points in sorted(by_key.items())
    }


def read_config(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    """The resolved config's summary (algorithm, mode, staleness bound, model, ...) and its text."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    import yaml

    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        warnings.append(f"{CONFIG}: not valid YAML ({e}); no config summary")
        return {"summary": [], "text": text}
    if not isinstance(config, dict):
        return {"summary": [], "text": text}

    def get(*keys: str) -> Any:
        node: Any = config
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node

    model = get("model", "path") or (
        f"builder {get('model', 'builder')}" if get("model", "builder") else None
    )
    env = get("env")
    summary = [
        ("algorithm", get("algorithm", "name")),
        ("mode", get("trainer", "mode")),
        ("max_staleness", get("trainer", "max_staleness")),
        ("model", model),
        ("steps", get("trainer", "steps")),
        ("prompts × samples", _join(get("trainer", "prompts_per_step"), get("rollout", "sampling", "n"))),
        ("lr", get("learner", "lr")),
        ("rewards", ", ".join(str(r.get("name") or r.get("import_path")) for r in get("rewards") or [])),
        ("env", (env.get("name") or env.get("import_path")) if isinstance(env, dict) else None),
    ]
    return {"summary": [[k, v] for k, v in summary if v not in (None, "")], "text": text}


def expert_load(records: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Per layer, tokens per expert at each logged step (a layer missing at a step: an empty row)."""
    if not records:
        return None
    by_step = {r["step"]: r.get("load") or {} for r in records}
    steps = sorted(by_step)
    layers = sorted({layer for load in by_step.values() for layer in load}, key=_layer_order)
    return {
        "steps": steps,
        "layers": {layer: [_numbers(by_step[s].get(layer) or []) for s in steps] for layer in layers},
    }


def log_ratio(records: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if records is None:
        return None
    last = {r["step"]: r.get("by_version") or {} for r in records}  # a step written twice: the last one
    return [{"step": s, "by_version": _finite(last[s])} for s in sorted(last)]


def staleness_counts(
    rollouts: list[dict[str, Any]] | None, metrics: dict[str, dict[str, list[Any]]]
) -> dict[str, Any] | None:
    """Rollouts per staleness: from samples/rollouts.jsonl (every rollout, those dropped as too stale
    too), else summed over the steps' `staleness/hist_<s>` metrics (the kept rollouts only)."""
    if rollouts:
        found = Counter(int(r["staleness"]) for r in rollouts if isinstance(r.get("staleness"), int))
        dropped = sum(1 for r in rollouts if r.get("dropped"))
        return {"source": "rollouts", "counts": {str(s): found[s] for s in sorted(found)}, "dropped": dropped}
    hist = {int(k.rsplit("_", 1)[1]): v for k, v in metrics.items() if re.fullmatch(r"staleness/hist_\d+", k)}
    if not hist:
        return None
    dropped = sum(v for v in metrics.get("staleness/dropped", {}).get("y", []) if v is not None)
    counts = {str(s): sum(v for v in hist[s]["y"] if v is not None) for s in sorted(hist)}
    return {"source": "metrics", "counts": counts, "dropped": dropped}


def rollout_records(
    records: list[dict[str, Any]] | None, budget: int, warnings: list[str], prompts: dict[str, str]
) -> dict[str, list[dict[str, Any]]] | None:
    """The rollout records by step, `sample` filled in where the run predates it (order within the step),
    long texts cut, each prompt text kept once in `prompts` (by prompt_id); over `budget` records, steps
    spread over the run are kept."""
    if records is None:
        return None
    by_step: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        rows = by_step.setdefault(record["step"], [])
        record = dict(record)
        record.setdefault("sample", len(rows))
        for field in ("prompt", "response"):
            text = record.get(field)
            if isinstance(text, str) and len(text) > MAX_TEXT:
                record[field] = text[:MAX_TEXT] + f" … [{len(text) - MAX_TEXT:,} more characters]"
        prompt_id, prompt = record.get("prompt_id"), record.get("prompt")
        if (
            isinstance(prompt_id, str)
            and isinstance(prompt, str)
            and prompts.setdefault(prompt_id, prompt) == prompt
        ):
            del record["prompt"]  # the page finds it in prompts[prompt_id]
        rows.append(_finite(record))
    keep = spread(sorted(by_step), {s: len(rows) for s, rows in by_step.items()}, budget)
    if len(keep) < len(by_step):
        warnings.append(
            f"{ROLLOUTS}: the rollouts of {len(by_step) - len(keep)} of {len(by_step)} steps are left out "
            f"(budget {budget:,} records; --max-rollouts raises it)"
        )
    return {str(s): by_step[s] for s in keep}


def trajectory(row: dict[str, Any]) -> dict[str, Any]:
    """One parquet row (one trajectory's response tokens) in the payload's compact form."""
    trainable, tool, accepted = (row.get(k) or [] for k in ("trainable", "tool", "token_accepted"))
    n = len(row.get("token_ids") or [])
    rollout, train = list(row.get("rollout_logp") or []), list(row.get("train_logp") or [])
    flags = [
        (FLAG_TRAINABLE if _at(trainable, i) else 0)
        | (FLAG_TOOL if _at(tool, i) else 0)
        | (FLAG_ACCEPTED if _at(accepted, i) else 0)
        for i in range(n)
    ]
    return {
        "prompt_id": row.get("prompt_id"),
        "reward": _finite(row.get("reward")),
        "traj_accepted": row.get("traj_accepted"),
        "staleness": row.get("staleness"),
        "ids": list(row.get("token_ids") or []),
        "text": list(row.get("tokens") or []),
        "rollout_logp": _rounded(rollout, 4),
        "log_ratio": [_log_ratio(train, rollout, i) for i in range(n)],
        "flags": flags,
        "version": list(row.get("version") or []),
        "advantage": _rounded(row.get("advantage"), 4),
    }


def spread(steps: list[int], sizes: dict[int, int], budget: int) -> list[int]:
    """All `steps` if their sizes fit `budget`; else as many as fit on average, evenly spaced over the
    run, always the last."""
    total = sum(sizes.values())
    if total <= budget or not steps:
        return steps
    count = max(1, min(len(steps), int(budget / (total / len(steps)))))
    if count == 1:
        return steps[-1:]
    picks = {round(i * (len(steps) - 1) / (count - 1)) for i in range(count)}
    return [steps[i] for i in sorted(picks)]


def to_json(payload: dict[str, Any]) -> str:
    """Compact JSON that is safe inside an HTML <script> element (no '<' outside escapes)."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False, ensure_ascii=False).replace(
        "<", "\\u003c"
    )


def _list_total(table: Any, column: str) -> int:
    """The number of items in a list column of an arrow table (0 when the column is missing)."""
    if column not in table.column_names:
        return 0
    import pyarrow.compute as pc

    total = pc.sum(pc.list_value_length(table.column(column))).as_py()
    return int(total or 0)


def _stat_key(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _rel(path: Path) -> str:
    """`samples/rollouts.jsonl` or `metrics.jsonl`: the file's name within its run directory."""
    return f"{path.parent.name}/{path.name}" if path.parent.name == "samples" else path.name


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _at(values: Sequence[Any], i: int) -> bool:
    return i < len(values) and bool(values[i])


def _rounded(values: Sequence[float | None] | None, digits: int) -> list[float | None]:
    return [None if v is None or not math.isfinite(v) else round(v, digits) for v in values or []]


def _log_ratio(train: Sequence[float | None], rollout: Sequence[float | None], i: int) -> float | None:
    """train - rollout log-prob of token i to 3 significant digits (kept at full scale: a mismatch of 1e-7
    survives, where rounding each log-prob would lose it); None when either is missing or not finite."""
    t, r = (train[i] if i < len(train) else None), (rollout[i] if i < len(rollout) else None)
    if t is None or r is None or not math.isfinite(t - r):
        return None
    return float(f"{t - r:.3g}")


def _numbers(values: Sequence[Any]) -> list[float | None]:
    return [v if _is_number(v) and math.isfinite(v) else None for v in values]


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _layer_order(layer: str) -> tuple[int, str]:
    return (int(layer), "") if layer.isdigit() else (1 << 30, layer)


def _join(*values: Any) -> str | None:
    return " × ".join(str(v) for v in values) if all(v is not None for v in values) else None
