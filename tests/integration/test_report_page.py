"""The run report and the live dashboard in headless Chromium, on synthetic run directories
(tests/report_checks.py writes them in the formats a run writes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from report_checks import (
    append_step,
    assert_coloured_tokens,
    assert_no_console_errors,
    assert_plotted_equals_metrics,
    metric_points,
    panel_text,
    plotted,
    wait_ready,
    warnings_text,
    write_run,
)

from rlstack.monitor.chromium import Chromium
from rlstack.monitor.report import serve, write_report


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    with Chromium(width=1400, height=1000) as chromium:
        yield chromium


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """run_a: MoE, log-ratio file, token samples, a cut-short last metrics line; run_b: none of these."""
    root = tmp_path_factory.mktemp("report_runs")
    a = write_run(root / "run_a", truncated_last_line=True)
    b = write_run(root / "run_b", moe=False, log_ratio=False, entropy=False, tokens=False, seed=3)
    return a, b


def test_report_overlay(browser: Chromium, runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = runs
    out = write_report([a, b], tmp_path / "report.html")
    page = browser.open(out.as_uri())
    wait_ready(page)
    assert_no_console_errors(page)

    compared = assert_plotted_equals_metrics(
        page,
        a,
        {
            "reward": ["reward/mean"],
            "eval": ["eval/greedy_accuracy", "eval/sampled_accuracy"],  # step 0 and 6, logged apart
            "grad_norm": ["actor/grad_norm"],  # null at step 3
            "acceptance": ["filter/token_accept", "filter/traj_accept"],
            "routing": ["moe/layer1/routing_confidence"],
            "time": ["time/generate"],
        },
    )
    compared += assert_plotted_equals_metrics(page, b, {"reward": ["reward/mean"]})
    assert compared == 9
    # the null is drawn as a gap (null), steps a series lacks as spanned (undefined) in uPlot's data
    drawn = page.eval(
        "RLSTACK.charts.grad_norm.data[1].map((v) => v === null ? 'gap' : v === undefined ? 'none' : v)"
    )
    assert drawn[2] == "gap" and metric_points(a, "actor/grad_norm")[1][2] is None
    assert [s["run"] for s in plotted(page, "staleness_hist")] == ["run_a", "run_b"]
    assert plotted(page, "staleness_hist")[0]["y"] == [12, 6, 6]

    summary = assert_coloured_tokens(page, expect_tool_turn=True)
    assert summary["rejected"] >= 1
    assert "metrics.jsonl: the last line was cut short" in warnings_text(page)
    assert "not in run_b" in panel_text(page, "routing")
    header = page.eval("document.querySelector('header').innerText")
    for text in ("run_a", "run_b", "mispo", "async", "max_staleness", "builder tiny", "steps done"):
        assert text in header
    page.screenshot(tmp_path / "report.png")
    assert_no_console_errors(page)
    page.close()


def test_report_missing_parts(browser: Chromium, runs: tuple[Path, Path], tmp_path: Path) -> None:
    """A run without MoE layers, log_ratio.jsonl, entropy or token samples: each panel says so."""
    _, b = runs
    page = browser.open(write_report([b], tmp_path / "b.html").as_uri())
    wait_ready(page)
    assert_no_console_errors(page)
    assert "no MoE layers in this run" in panel_text(page, "routing")
    assert "no MoE layers in this run" in panel_text(page, "expert_load")
    assert "actor/entropy is not logged" in panel_text(page, "entropy")
    assert "no log_ratio.jsonl" in panel_text(page, "log_ratio_version")
    assert plotted(page, "log_ratio_step")  # the per-step quantiles stand in
    page.eval("document.querySelector('#rollout-browser tr.row[data-sample=\"2\"]').click()")
    detail = page.eval("document.querySelector('#rollout-browser .detail').innerText")
    assert "no per-token data" in detail and "What is 6+6?" in detail  # prompt text, kept once per id
    row = page.eval("document.querySelector('#rollout-browser tr.row[data-sample=\"2\"]').innerText")
    assert "unscored: math: timed out" in row
    assert warnings_text(page) == ""
    page.close()

    fresh = tmp_path / "fresh"  # a run that has written only its config so far
    fresh.mkdir()
    (fresh / "config.resolved.yaml").write_text((b / "config.resolved.yaml").read_text())
    page = browser.open(write_report([fresh], tmp_path / "fresh.html").as_uri())
    wait_ready(page)
    assert_no_console_errors(page)
    assert "no metrics.jsonl in this run" in panel_text(page, "reward")
    assert "no samples/rollouts.jsonl" in page.eval("document.getElementById('rollout-browser').innerText")
    page.close()


def test_dashboard_follows_the_run(browser: Chromium, tmp_path: Path) -> None:
    run = write_run(tmp_path / "live_run", steps=4)
    server = serve([run], port=0, refresh_s=0.3)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        page = browser.open(server.url)
        wait_ready(page)
        assert "last step 4" in page.eval("document.getElementById('live-status').innerText")
        opened = page.eval("RLSTACK.browse({run: 0, step: 3, sample: 1})")
        assert opened == {"run": 0, "step": 3, "sample": 1}
        page.eval("window.__same_document = true")

        append_step(run, 5)
        page.wait_for("document.getElementById('live-status').innerText.includes('last step 5')", timeout=15)
        assert page.eval("window.__same_document === true")  # redrawn in place, not reloaded
        assert_plotted_equals_metrics(page, run, {"reward": ["reward/mean"], "time": ["time/step"]})
        # the rollout browser kept its step and open trajectory
        assert page.eval("document.querySelector('#rollout-browser .detail').dataset.sample") == "1"
        assert page.eval("document.querySelector('#rollout-browser select[aria-label=step]').value") == "3"
        page.screenshot(tmp_path / "dashboard.png")
        assert_no_console_errors(page)
        page.close()
    finally:
        server.close()
