"""Helpers of the run-report tests: a synthetic run directory in the formats a run writes, and checks of
the rendered page through `window.RLSTACK` (rlstack/monitor/report/assets/report.js), reusable on a real
run's directory."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rlstack.monitor.chromium import Page

# ---------------------------------------------------------------- a synthetic run directory

TOOL_TEXT = ["<tool>", "42", "</tool>"]


def write_run(
    run_dir: Path,
    steps: int = 6,
    *,
    moe: bool = True,
    log_ratio: bool = True,
    entropy: bool = True,
    tokens: bool = True,
    truncated_last_line: bool = False,
    seed: int = 0,
) -> Path:
    """A small run directory: config, metrics (step 0 placement and eval records, eval again at the end,
    a null grad-norm at step 3), expert load, log-ratio quantiles, rollouts (one unscored, one dropped as
    stale per step) and per-token parquet samples with a tool turn and token-filter rejections."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.resolved.yaml").write_text(
        "model: {path: null, builder: tiny}\n"
        f"trainer: {{steps: {steps}, mode: async, max_staleness: 1, prompts_per_step: 2}}\n"
        "algorithm: {name: mispo}\n"
        "rollout: {sampling: {n: 2}}\n"
        "learner: {lr: 0.001}\n"
        "rewards: [{name: math}]\n"
        "env: null\n"
    )
    (run_dir / "placement.json").write_text('{"driver": {"pid": 1}}\n')
    with (run_dir / "metrics.jsonl").open("w") as f:
        for record in metric_records(steps, moe=moe, entropy=entropy, seed=seed):
            f.write(json.dumps(record) + "\n")
        if truncated_last_line:
            f.write(f'{{"step": {steps + 1}, "time": 1796200000.5, "reward/me')
    if moe:
        with (run_dir / "expert_load.jsonl").open("w") as f:
            for step in range(1, steps + 1):
                load = {
                    str(layer): [float(10 * ((e + step + layer) % 5) + e) for e in range(4)]
                    for layer in (1, 2)
                }
                f.write(json.dumps({"step": step, "load": load}) + "\n")
    if log_ratio:
        with (run_dir / "log_ratio.jsonl").open("w") as f:
            for step in range(1, steps + 1):
                by_version = {
                    str(v): {
                        "tokens": 40 + v,
                        "mean": 0.01 * (step - v),
                        "q": {q: round((float(q) - 0.5) * 0.2 * (1 + step - v), 6) for q in QUANTILES},
                    }
                    for v in range(max(0, step - 2), step)
                }
                f.write(json.dumps({"step": step, "by_version": by_version}) + "\n")
    (run_dir / "samples").mkdir(exist_ok=True)
    with (run_dir / "samples" / "rollouts.jsonl").open("w") as f:
        for step in range(1, steps + 1):
            for record in rollout_records(step):
                f.write(json.dumps(record) + "\n")
    if tokens:
        write_token_files(run_dir, steps)
    return run_dir


QUANTILES = ("0.05", "0.25", "0.5", "0.75", "0.95")


def metric_records(steps: int, *, moe: bool, entropy: bool, seed: int) -> list[dict[str, Any]]:
    """Records as the driver logs them: several per step 0 and per last step (eval logged apart)."""
    t0 = 1796200000.0
    records: list[dict[str, Any]] = [
        {"step": 0, "time": t0, "placement": {"driver": {"pid": 1}, "rollout": [{"pid": 2}]}},
        {
            "step": 0,
            "time": t0 + 1,
            "eval/num_problems": 8.0,
            "eval/greedy_accuracy": 0.125,
            "eval/sampled_accuracy": 0.0,
            "eval/greedy_unscored": 0.0,
        },
    ]
    for step in range(1, steps + 1):
        r: dict[str, Any] = {
            "step": step,
            "time": t0 + 10 * step,
            "reward/mean": round(0.1 * step + 0.01 * seed, 4),
            "reward/unscored": 1.0,
            "reward/math_errors": float(step % 2),
            "reward/math_timeouts": 0.0,
            "response/length_mean": 20.0 + step,
            "actor/grad_norm": None if step == 3 else 1.0 / step,
            "actor/lr": 0.001,
            "filter/token_accept": 1.0 - 0.02 * step,
            "filter/traj_accept": 1.0 - 0.05 * step,
            "filter/combined_accept": (1.0 - 0.02 * step) * (1.0 - 0.05 * step),
            "filter/log_ratio_p05": -0.01 * step,
            "filter/log_ratio_p50": 0.0,
            "filter/log_ratio_p95": 0.012 * step,
            "staleness/mean": 0.5,
            "staleness/max": 1.0,
            "staleness/dropped": 1.0,
            "staleness/hist_0": 2.0,
            "staleness/hist_1": 1.0,
            "time/generate": 1.5 + 0.1 * step,
            "time/score": 0.2,
            "time/train": 2.0,
            "time/sync": 0.3,
            "time/step": 4.0 + 0.1 * step,
            "throughput/generate_wait_tokens_per_s": 100.0 * step,
            "faults/rollout_restarts": 0.0,
            "learner/version": float(step),
        }
        if entropy:
            r["actor/entropy"] = 4.0 - 0.1 * step
        if moe:
            r |= {
                "moe/layer1/routing_confidence": 0.3 + 0.01 * step,
                "moe/layer2/routing_confidence": 0.35 + 0.01 * step,
                "moe/router_entropy": 1.3 - 0.01 * step,
                "moe/routing_mismatch": 0.05,
            }
        records.append(r)
    records.append(
        {
            "step": steps,
            "time": t0 + 10 * steps + 5,
            "eval/num_problems": 8.0,
            "eval/greedy_accuracy": 0.5,
            "eval/sampled_accuracy": 0.25,
            "eval/greedy_unscored": 1.0,
        }
    )
    return records


def rollout_records(step: int) -> list[dict[str, Any]]:
    """Four rollouts: trained, rejected by the trajectory filter, unscored, dropped as too stale."""
    base = {
        "step": step,
        "version": step - 1,
        "oldest_version": step - 1,
        "staleness": 0,
        "prompt": f"<|user|>What is {step}+{step}?<|assistant|>",
        "finish_reason": "stop",
    }
    return [
        base
        | {
            "sample": 0,
            "prompt_id": f"p{step}",
            "response": f"{2 * step}",
            "reward": 1.0,
            "traj_accepted": True,
            "reward_info": {"math": {"parsed": str(2 * step)}},
        },
        base
        | {
            "sample": 1,
            "prompt_id": f"p{step}",
            "response": "I use the tool <tool>42</tool> so 7",
            "reward": 0.0,
            "traj_accepted": False,
            "staleness": 1,
            "version": step - 2,
            "episode": {"turns": 2, "tool_calls": 1, "tool_errors": 0, "tool_timeouts": 0, "error": None},
        },
        base
        | {
            "sample": 2,
            "prompt_id": f"q{step}",
            "response": "…",
            "reward": None,
            "traj_accepted": False,
            "unscored_reason": "math: timed out after 60 s",
        },
        base
        | {
            "sample": 3,
            "prompt_id": f"q{step}",
            "response": "old",
            "reward": None,
            "traj_accepted": False,
            "staleness": 2,
            "version": step - 3,
            "dropped": "stale: more than 1 updates old",
        },
    ]


def token_rows(step: int) -> list[dict[str, Any]]:
    """Per-token rows of samples 0 and 1 (sample 1 holds a tool turn and rejected tokens)."""
    rows = []
    for sample in (0, 1):
        policy_a = ["I", " use", " the", " tool", " "] if sample else [str(2 * step), "<eos>"]
        tool = TOOL_TEXT if sample else []
        policy_b = [" so", " 7"] if sample else []
        text = policy_a + tool + policy_b
        is_tool = [False] * len(policy_a) + [True] * len(tool) + [False] * len(policy_b)
        rollout_logp: list[float | None] = []
        train_logp: list[float | None] = []
        accepted = []
        for i, t in enumerate(is_tool):
            delta = [0.3, -0.25, 0.05, 0.8, -0.6, 0.0, 0.0, 0.0, 0.1, -0.02][i % 10] * (1 + 0.1 * step)
            rollout_logp.append(None if t else -1.0 - 0.1 * i)
            train_logp.append(None if t else round(-1.0 - 0.1 * i + delta, 6))
            accepted.append(not t and abs(delta) < 0.5)
        rows.append(
            {
                "step": step,
                "sample": sample,
                "prompt_id": f"p{step}",
                "reward": float(sample == 0),
                "traj_accepted": sample == 0,
                "staleness": sample,
                "token_ids": [100 + i for i in range(len(text))],
                "tokens": text,
                "rollout_logp": rollout_logp,
                "train_logp": train_logp,
                "trainable": [not t for t in is_tool],
                "tool": is_tool,
                "token_accepted": accepted,
                "version": [step - 1 - sample] * len(text),
                "advantage": [0.5 if sample == 0 else -0.5] * len(text),
            }
        )
    return rows


def write_token_files(run_dir: Path, steps: int) -> None:
    """samples/tokens/step_NNNNNNN.parquet for every step, in the writer's schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlstack.monitor.samples import token_schema

    schema = token_schema()
    (run_dir / "samples" / "tokens").mkdir(parents=True, exist_ok=True)
    for step in range(1, steps + 1):
        table = pa.Table.from_pylist(token_rows(step), schema=schema)
        pq.write_table(table, run_dir / "samples" / "tokens" / f"step_{step:07d}.parquet")


def append_step(run_dir: Path, step: int) -> None:
    """One more step record in metrics.jsonl (a run going on), as the dashboard test adds it."""
    record = {"step": step, "time": 1796200000.0 + 10 * step, "reward/mean": 0.05 * step, "time/step": 4.0}
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- reading metrics.jsonl as the page should


def metric_points(run_dir: Path, key: str) -> tuple[list[int], list[float | None]]:
    """(steps, values) of `key` in metrics.jsonl: one point per step (the last value logged at it), null
    and non-finite values as None; a cut-short last line is skipped."""
    points: dict[int, float | None] = {}
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().split("\n") if line.strip()]
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            assert i == len(lines) - 1, f"metrics.jsonl line {i + 1} is not JSON"
            continue
        if key in record:
            value = record[key]
            points[record["step"]] = None if value is None or not math.isfinite(value) else value
    steps = sorted(points)
    return steps, [points[s] for s in steps]


# ---------------------------------------------------------------- page checks


def wait_ready(page: Page, timeout: float = 30.0) -> None:
    page.wait_for("window.RLSTACK && window.RLSTACK.ready === true", timeout=timeout)


def assert_no_console_errors(page: Page) -> None:
    assert not page.console_errors, f"console errors: {page.console_errors}"


def plotted(page: Page, panel: str) -> list[dict[str, Any]]:
    """The series a panel plots, as window.RLSTACK.series(panel) gives them: [{label, run, key, x, y}]."""
    result: list[dict[str, Any]] = page.eval(f"window.RLSTACK.series({json.dumps(panel)})")
    return result


def assert_plotted_equals_metrics(
    page: Page, run_dir: Path, panels: dict[str, list[str]], run_name: str | None = None
) -> int:
    """Each key's plotted points (step and value; null as a gap) in its panel equal metrics.jsonl's for the
    run (named `run_name`, default: the directory's name). Returns the number of series compared."""
    run = run_name or run_dir.resolve().name
    compared = 0
    for panel, keys in panels.items():
        series = plotted(page, panel)
        for key in keys:
            found = [s for s in series if s["key"] == key and s["run"] == run]
            assert len(found) == 1, f"panel {panel}: {len(found)} series of {key} for run {run}: {series}"
            steps, values = metric_points(run_dir, key)
            assert found[0]["x"] == steps, f"{panel}/{key}: steps {found[0]['x']} != {steps}"
            assert found[0]["y"] == values, f"{panel}/{key}: values {found[0]['y']} != {values}"
            compared += 1
    return compared


def open_trajectory(
    page: Page, run: int | None = None, step: int | None = None, sample: int | None = None
) -> Any:
    """Expand a trajectory in the rollout browser (default: the last one with per-token data, preferring one
    with a tool turn); returns {run, step, sample} of what was opened, or None if no run has token data."""
    args = json.dumps({"run": run, "step": step, "sample": sample})
    return page.eval(f"window.RLSTACK.browse({args})")


def token_summary(page: Page) -> dict[str, Any]:
    """What the expanded trajectory shows: token spans, those with a non-white background, rejected ones,
    tool turns and their tokens (and whether any tool token carries a background colour)."""
    result: dict[str, Any] = page.eval(
        """(() => {
        const view = document.querySelector('#rollout-browser .detail .tokens');
        if (!view) return null;
        const toks = [...view.querySelectorAll('.tok')];
        const policy = toks.filter((t) => !t.classList.contains('tool'));
        const bg = (t) => t.style.backgroundColor;
        const coloured = policy.filter((t) => bg(t) && !/^rgb\\(255, 255, 255\\)$/.test(bg(t))
          && !t.classList.contains('untrained'));
        const turns = [...view.querySelectorAll('.tool-turn')];
        return {tokens: toks.length, policy: policy.length, coloured: coloured.length,
          rejected: view.querySelectorAll('.tok.rejected').length,
          tool_turns: turns.length, tool_tokens: view.querySelectorAll('.tool-turn .tok.tool').length,
          tool_labels: turns.map((t) => t.querySelector('.tool-label').textContent),
          tool_coloured: toks.filter((t) => t.classList.contains('tool') && bg(t)).length,
          titles: policy.slice(0, 3).map((t) => t.title)};
    })()"""
    )
    return result


def assert_coloured_tokens(page: Page, expect_tool_turn: bool = False) -> dict[str, Any]:
    """Open a trajectory with per-token data; its policy tokens are coloured by log-ratio (inline
    background), their hover text names id, log-probs, version and advantage; with `expect_tool_turn`,
    the tool tokens sit in a labelled tool-turn block, not coloured as policy tokens."""
    opened = open_trajectory(page)
    assert opened, "no trajectory with per-token data in the rollout browser"
    summary = token_summary(page)
    assert summary and summary["policy"] > 0, f"no token spans for {opened}: {summary}"
    assert summary["coloured"] > 0, f"no coloured tokens for {opened}: {summary}"
    for title in summary["titles"]:
        for part in ("id ", "rollout logp", "train logp", "version", "advantage"):
            assert part in title, f"token hover text {title!r} lacks {part!r}"
    if expect_tool_turn:
        assert summary["tool_turns"] >= 1 and summary["tool_tokens"] >= 1, f"no tool turn: {summary}"
        assert all("tool turn" in label for label in summary["tool_labels"]), summary
        assert summary["tool_coloured"] == 0, f"tool tokens coloured as policy tokens: {summary}"
    return {**summary, "opened": opened}


def panel_text(page: Page, panel: str) -> str:
    text: str = page.eval(f"document.getElementById('panel-{panel}').innerText")
    return text


def warnings_text(page: Page) -> str:
    text: str = page.eval("(document.getElementById('warnings') || {innerText: ''}).innerText")
    return text
