"""What a run keeps of its rollouts: rollout records, the per-token sample (parquet), log-ratio quantiles."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rlstack.learner.batch import collate
from rlstack.metrics import truncate_metrics
from rlstack.mispo import MISFilter
from rlstack.mispo.config import AlgorithmConfig
from rlstack.monitor.config import LoggingConfig
from rlstack.monitor.samples import (
    LOG_RATIO,
    ROLLOUTS,
    DroppedRollout,
    SampleWriter,
    pick_samples,
    thin_token_files,
    token_file,
    token_files,
)
from rlstack.types import Rollout


def _rollouts(step: int) -> list[Rollout]:
    out = []
    for i in range(6):
        n = 3 + i
        mask = [1] * n
        versions = [step - 1] * n
        if i == 1:  # a tool turn in the middle of the response
            mask = [1, 0, 0] + [1] * (n - 3)
        if i == 2:  # spans two weights versions
            versions = [step - 2] * 2 + [step - 1] * (n - 2)
        out.append(
            Rollout(
                prompt_id=f"p{i // 2}",
                prompt_ids=[1, 2],
                response_ids=list(range(10, 10 + n)),
                response_logprobs=[-1.0 - 0.1 * t for t in range(n)],
                finish_reason="stop",
                version=step - 1,
                response_mask=mask,
                response_versions=versions,
                reward=None if i == 5 else float(i % 2),
                unscored_reason="timeout" if i == 5 else None,
            )
        )
    return out


def _batch(rollouts: list[Rollout], seed: int = 0):  # type: ignore[no-untyped-def]
    batch = collate(rollouts, pad_id=0).without_unscored()
    g = torch.Generator().manual_seed(seed)
    old_logp = (
        batch.rollout_logp + 0.3 * torch.randn(batch.rollout_logp.shape, generator=g)
    ) * batch.loss_mask
    old_logp[3, 4] = batch.rollout_logp[3, 4] + 5.0  # far outside the token band: rejected
    flt = MISFilter(AlgorithmConfig(traj_filter="off"))(old_logp, batch.rollout_logp, batch.loss_mask)
    return batch.replace(old_logp=old_logp, filter=flt, advantages=batch.loss_mask * 0.5)


def _write(writer: SampleWriter, step: int) -> tuple[list[Rollout], object]:
    rollouts = _rollouts(step)
    batch = _batch(rollouts, seed=step)
    stale = [DroppedRollout(_rollouts(step)[0], "stale: more than 1 updates old")]
    writer.write(step, rollouts, batch, [{"math": {"ok": i}} for i in range(6)], stale, step - 1)
    return rollouts, batch


def test_a_step_writes_rollouts_tokens_and_log_ratio_quantiles(tmp_path: Path) -> None:
    writer = SampleWriter(tmp_path, LoggingConfig(token_samples_per_step=4), lambda t: f"<{t}>")
    rollouts, batch = _write(writer, 3)

    records = [json.loads(line) for line in (tmp_path / ROLLOUTS).read_text().splitlines()]
    assert [r["sample"] for r in records] == list(range(7))  # 6 trained + 1 dropped as stale
    assert records[-1]["dropped"].startswith("stale") and records[-1]["traj_accepted"] is False
    assert records[5]["reward"] is None and records[5]["unscored_reason"] == "timeout"
    assert records[0]["reward_info"] == {"math": {"ok": 0}}

    table = pq.read_table(token_file(tmp_path, 3)).to_pylist()
    assert len(table) == 4
    picked = [row["sample"] for row in table]
    assert picked == pick_samples(batch.filter.traj_mask.tolist(), 4)  # type: ignore[attr-defined]
    for row in table:
        r = rollouts[row["sample"]]
        b, p = row["sample"], len(r.prompt_ids)
        n = len(r.response_ids)
        assert row["token_ids"] == r.response_ids
        assert row["tokens"] == [f"<{t}>" for t in r.response_ids]
        assert row["tool"] == [not m for m in r.response_mask]  # type: ignore[union-attr]
        assert row["version"] == r.response_versions
        trainable = batch.loss_mask[b, p : p + n].bool().tolist()  # type: ignore[attr-defined]
        assert row["trainable"] == trainable
        for t in range(n):
            if trainable[t]:
                assert row["train_logp"][t] == pytest.approx(batch.old_logp[b, p + t].item())  # type: ignore[attr-defined]
                assert row["rollout_logp"][t] == pytest.approx(r.response_logprobs[t])
            else:
                assert row["train_logp"][t] is None
        assert row["token_accepted"] == batch.filter.token_mask[b, p : p + n].tolist()  # type: ignore[attr-defined]
    (row3,) = [row for row in table if row["sample"] == 3]
    assert not all(row3["token_accepted"])  # the +5 nats token

    (record,) = [json.loads(line) for line in (tmp_path / LOG_RATIO).read_text().splitlines()]
    assert record["step"] == 3 and set(record["by_version"]) == {"1", "2"}  # two weights versions
    trainable = batch.loss_mask.bool()  # type: ignore[attr-defined]
    ratios = batch.filter.log_ratio[trainable & (batch.token_versions == 2)].double()  # type: ignore[attr-defined]
    newest = record["by_version"]["2"]
    assert newest["tokens"] == len(ratios)
    assert newest["q"]["0.5"] == pytest.approx(torch.quantile(ratios, 0.5).item())
    assert newest["mean"] == pytest.approx(ratios.mean().item())
    assert newest["q"]["0.05"] < newest["q"]["0.5"] < newest["q"]["0.95"]


def test_pick_samples_keeps_rejected_trajectories_and_spreads_the_rest() -> None:
    accepted = [True] * 10 + [False] * 3 + [True] * 10
    picked = pick_samples(accepted, 8)
    assert len(picked) == 8 and {10, 11, 12} <= set(picked)
    assert picked == sorted(picked) and min(picked) == 0
    assert pick_samples([True, False], 16) == [0, 1]


def test_token_files_stay_bounded_and_span_the_run(tmp_path: Path) -> None:
    (tmp_path / "samples" / "tokens").mkdir(parents=True)
    for step in range(1, 101):
        token_file(tmp_path, step).write_bytes(b"x")
        thin_token_files(tmp_path, keep=10)
    steps = list(token_files(tmp_path))
    assert len(steps) <= 10
    assert steps[-1] == 100 and steps[0] <= 10  # recent steps and the run's start
    truncate_metrics(tmp_path, 90)
    assert max(token_files(tmp_path)) <= 90


def test_truncate_drops_later_samples(tmp_path: Path) -> None:
    writer = SampleWriter(tmp_path, LoggingConfig(token_samples_per_step=2), str)
    for step in (2, 3, 4):
        _write(writer, step)
    truncate_metrics(tmp_path, 3)
    assert list(token_files(tmp_path)) == [2, 3]
    for table in (ROLLOUTS, LOG_RATIO):
        steps = {json.loads(line)["step"] for line in (tmp_path / table).read_text().splitlines()}
        assert steps == {2, 3}
