"""What a run keeps of its rollouts, for the report's rollout browser and off-policy health view.

Per step, three records (appended; `rlstack.metrics.truncate_metrics` cuts them back when a run redoes
steps):
- `samples/rollouts.jsonl`: one line per rollout of the step: prompt, response, reward and its details,
  staleness, the trajectory filter's decision; rollouts dropped before training (too stale, or a group
  without signal under dynamic sampling) are kept too, with the reason.
- `samples/tokens/step_NNNNNNN.parquet`: per-token data of a bounded sample of the step's trajectories
  (`logging.token_samples_per_step`): token ids and text, rollout and training log-probs, loss, tool and
  filter masks, versions, advantages. At most `logging.token_samples_keep` files: beyond that every other
  file of the older half goes, so the directory stays bounded and still spans the whole run.
- `log_ratio.jsonl`: quantiles of the train/rollout log-ratio over ALL trainable tokens of the step, per
  weights version that generated them (exact, not sampled).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlstack.monitor.config import LoggingConfig
from rlstack.types import Rollout

if TYPE_CHECKING:
    from rlstack.learner.batch import PolicyBatch

ROLLOUTS = Path("samples") / "rollouts.jsonl"
TOKENS = Path("samples") / "tokens"
LOG_RATIO = "log_ratio.jsonl"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_TOKEN_FILE = re.compile(r"step_(\d+)\.parquet$")


def token_file(run_dir: Path, step: int) -> Path:
    return run_dir / TOKENS / f"step_{step:07d}.parquet"


def token_files(run_dir: Path) -> dict[int, Path]:
    """The per-token sample files of a run, by step."""
    found = {}
    for path in (run_dir / TOKENS).glob("step_*.parquet"):
        if match := _TOKEN_FILE.search(path.name):
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class DroppedRollout:
    """A rollout of the step that did not train, why, and its reward details (if it was scored)."""

    rollout: Rollout
    reason: str
    reward_info: dict[str, Any] = field(default_factory=dict)


class SampleWriter:
    """Writes a step's rollout records, its per-token sample and its log-ratio quantiles."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, decode: Callable[[int], str]) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.decode = decode  # token id -> its text, for the browser
        (run_dir / TOKENS).mkdir(parents=True, exist_ok=True)

    def write(
        self,
        step: int,
        rollouts: Sequence[Rollout],
        batch: PolicyBatch,
        reward_info: Sequence[dict[str, Any]],
        dropped: Sequence[DroppedRollout],
        current_version: int,
    ) -> None:
        """`batch` holds `rollouts` in order (row b = rollouts[b]) with the step's filter and advantages;
        `dropped` left before batching. Staleness is counted against `current_version`."""
        if batch.filter is None or batch.old_logp is None:
            raise ValueError("SampleWriter.write: the batch has no filter result / training log-probs yet")
        self._write_rollouts(step, rollouts, batch, reward_info, dropped, current_version)
        self._write_log_ratio(step, batch)
        if self.cfg.token_samples_per_step > 0:
            self._write_tokens(step, rollouts, batch, current_version)
            thin_token_files(self.run_dir, self.cfg.token_samples_keep)

    def _write_rollouts(
        self,
        step: int,
        rollouts: Sequence[Rollout],
        batch: PolicyBatch,
        reward_info: Sequence[dict[str, Any]],
        dropped: Sequence[DroppedRollout],
        current_version: int,
    ) -> None:
        assert batch.filter is not None
        traj_ok = batch.filter.traj_mask.tolist()
        trained = zip(rollouts, traj_ok, reward_info, strict=True)
        entries: list[tuple[Rollout, bool, dict[str, Any], str | None]]
        entries = [(r, bool(ok), info, None) for r, ok, info in trained]
        entries += [(d.rollout, False, d.reward_info, d.reason) for d in dropped]
        with (self.run_dir / ROLLOUTS).open("a") as f:
            for sample, (rollout, accepted, info, why_dropped) in enumerate(entries):
                record: dict[str, Any] = {
                    "step": step,
                    "sample": sample,
                    "prompt_id": rollout.prompt_id,
                    "version": rollout.version,
                    "oldest_version": rollout.oldest_version,
                    "staleness": rollout.staleness(current_version),
                    "prompt": rollout.prompt_text,
                    "response": rollout.response_text,
                    "reward": rollout.reward,
                    "finish_reason": rollout.finish_reason,
                    "traj_accepted": accepted,
                }
                if rollout.reward is None:
                    record["unscored_reason"] = rollout.unscored_reason
                if why_dropped:
                    record["dropped"] = why_dropped
                if info:
                    record["reward_info"] = info
                if rollout.episode is not None:
                    e = rollout.episode
                    record["episode"] = {
                        "turns": e.turns,
                        "tool_calls": e.tool_calls,
                        "tool_errors": e.tool_errors,
                        "tool_timeouts": e.tool_timeouts,
                        "error": e.error,
                    }
                f.write(json.dumps(record, default=str) + "\n")

    def _write_log_ratio(self, step: int, batch: PolicyBatch) -> None:
        import torch

        assert batch.filter is not None
        trainable = batch.loss_mask.bool()  # (B, L), unscored rows already masked out
        log_ratio = batch.filter.log_ratio[trainable].double()  # (N,)
        versions = batch.token_versions[trainable]  # (N,)
        by_version: dict[str, dict[str, Any]] = {}
        for version in versions.unique().tolist():
            values = log_ratio[versions == version]
            values = values[torch.isfinite(values)]
            if not len(values):
                continue
            q = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
            by_version[str(version)] = {
                "tokens": len(values),
                "mean": values.mean().item(),
                "q": {str(p): v for p, v in zip(QUANTILES, q, strict=True)},
            }
        with (self.run_dir / LOG_RATIO).open("a") as f:
            f.write(json.dumps({"step": step, "by_version": by_version}) + "\n")

    def _write_tokens(
        self, step: int, rollouts: Sequence[Rollout], batch: PolicyBatch, current_version: int
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        assert batch.filter is not None and batch.old_logp is not None
        traj_ok = batch.filter.traj_mask.tolist()
        rows = pick_samples(traj_ok, self.cfg.token_samples_per_step)
        schema = token_schema()
        columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        for b in rows:
            r = rollouts[b]
            p, n = len(r.prompt_ids), len(r.prompt_ids) + len(r.response_ids)
            trainable = batch.loss_mask[b, p:n].bool()  # (n - p,)
            train_logp = batch.old_logp[b, p:n].double()
            advantage = (
                batch.advantages[b, p:n].double() if batch.advantages is not None else torch.zeros(n - p)
            )
            mask = r.response_mask or [1] * len(r.response_ids)
            columns["step"].append(step)
            columns["sample"].append(b)
            columns["prompt_id"].append(r.prompt_id)
            columns["reward"].append(r.reward)
            columns["traj_accepted"].append(bool(traj_ok[b]))
            columns["staleness"].append(r.staleness(current_version))
            columns["token_ids"].append(list(r.response_ids))
            columns["tokens"].append([self.decode(t) for t in r.response_ids])
            rollout_logp = zip(r.response_logprobs, mask, strict=True)
            columns["rollout_logp"].append([lp if m else None for lp, m in rollout_logp])
            columns["train_logp"].append(
                [v if t else None for v, t in zip(train_logp.tolist(), trainable.tolist(), strict=True)]
            )
            columns["trainable"].append(trainable.tolist())
            columns["tool"].append([not m for m in mask])
            columns["token_accepted"].append(batch.filter.token_mask[b, p:n].tolist())
            columns["version"].append(list(r.response_versions or []))
            columns["advantage"].append(advantage.tolist())
        table = pa.Table.from_pydict(columns, schema=schema)
        path = token_file(self.run_dir, step)
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(path)  # a reader never sees half a file


def token_schema() -> Any:
    """The pyarrow schema of a `samples/tokens/` file: one row per trajectory, list columns per token."""
    import pyarrow as pa

    return pa.schema(
        [
            ("step", pa.int64()),
            ("sample", pa.int64()),
            ("prompt_id", pa.string()),
            ("reward", pa.float64()),
            ("traj_accepted", pa.bool_()),
            ("staleness", pa.int64()),
            ("token_ids", pa.list_(pa.int64())),
            ("tokens", pa.list_(pa.string())),
            ("rollout_logp", pa.list_(pa.float64())),
            ("train_logp", pa.list_(pa.float64())),
            ("trainable", pa.list_(pa.bool_())),
            ("tool", pa.list_(pa.bool_())),
            ("token_accepted", pa.list_(pa.bool_())),
            ("version", pa.list_(pa.int64())),
            ("advantage", pa.list_(pa.float64())),
        ]
    )


def pick_samples(traj_accepted: Sequence[bool], k: int) -> list[int]:
    """Up to k rows of a step, deterministic: rejected trajectories (the ones a user inspects) fill up to
    half of k, accepted ones spread evenly over the batch the rest; either tops up when the other is short."""
    rejected = [b for b, ok in enumerate(traj_accepted) if not ok]
    accepted = [b for b, ok in enumerate(traj_accepted) if ok]
    room = k - min(len(rejected), k // 2)
    if len(accepted) > room:
        stride = len(accepted) / room
        accepted = [accepted[int(i * stride)] for i in range(room)]
    return sorted(rejected[: k - len(accepted)] + accepted)


def thin_token_files(run_dir: Path, keep: int) -> list[Path]:
    """Over `keep` files: delete every other file of the older half (a run of any length keeps at most
    `keep` files, denser towards its end). Returns the deleted paths."""
    files = list(token_files(run_dir).values())
    deleted: list[Path] = []
    while len(files) > keep:
        older = files[: len(files) // 2]
        doomed = older[1::2] or older[:1]
        for path in doomed:
            path.unlink()
            deleted.append(path)
        files = [f for f in files if f not in doomed]
    return deleted


def drop_token_files_after(run_dir: Path, last_step: int) -> None:
    """Delete the token files of steps after `last_step`, and any a killed write left half-made (the
    rest of a run's per-step files: rlstack.metrics.truncate_metrics)."""
    for step, path in token_files(run_dir).items():
        if step > last_step:
            path.unlink()
    for tmp in (run_dir / TOKENS).glob("*.tmp"):
        tmp.unlink()
