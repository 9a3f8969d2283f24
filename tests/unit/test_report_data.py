"""The run report's payload (rlstack.monitor.report.data), page, CLI and dashboard server; no browser."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.error import HTTPError

import pytest
from report_checks import append_step, metric_points, write_run

from rlstack.cli import main
from rlstack.monitor.report import ReportError, build_payload, render_page, serve
from rlstack.monitor.report.data import (
    FLAG_ACCEPTED,
    FLAG_TOOL,
    FLAG_TRAINABLE,
    PayloadBuilder,
    run_names,
    spread,
    to_json,
)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run_a", steps=4)


def test_metrics_one_point_per_step(run: Path) -> None:
    (payload_run,) = build_payload([run])["runs"]
    metrics = payload_run["metrics"]
    assert "placement" not in metrics and "time" not in metrics and "step" not in metrics
    assert metrics["eval/greedy_accuracy"] == {"x": [0, 4], "y": [0.125, 0.5]}  # records logged apart
    assert metrics["actor/grad_norm"]["y"][2] is None  # null (non-finite) kept as a gap
    for key in ("reward/mean", "actor/grad_norm", "time/step"):
        assert (metrics[key]["x"], metrics[key]["y"]) == tuple(map(list, metric_points(run, key)))
    assert payload_run["steps_done"] == 4
    assert payload_run["last_update"] == 1796200000.0 + 45
    assert payload_run["warnings"] == []
    summary = dict(payload_run["config"]["summary"])
    assert summary["algorithm"] == "mispo" and summary["mode"] == "async" and summary["max_staleness"] == 1
    assert summary["model"] == "builder tiny"


def test_cut_short_last_line_warns_bad_line_elsewhere_fails(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", steps=3, truncated_last_line=True)
    (payload_run,) = build_payload([run])["runs"]
    assert payload_run["steps_done"] == 3
    assert payload_run["warnings"] == [
        "metrics.jsonl: the last line was cut short (the run crashed or is writing); it was skipped"
    ]
    lines = (run / "samples" / "rollouts.jsonl").read_text().splitlines()
    lines[2] = lines[2][:30]
    (run / "samples" / "rollouts.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=r"rollouts\.jsonl: line 3 is not JSON"):
        build_payload([run])
    (run / "samples" / "rollouts.jsonl").write_text('{"no_step": 1}\n{"step": 1}\n')
    with pytest.raises(ReportError, match="line 1 is not a JSON object with an integer 'step'"):
        build_payload([run])


def test_missing_files_are_none(tmp_path: Path) -> None:
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "time": 5.0, "reward/mean": 0.5}\n')
    (payload_run,) = build_payload([run])["runs"]
    for part in ("config", "expert_load", "log_ratio", "rollouts", "tokens", "staleness"):
        assert payload_run[part] is None, part
    assert payload_run["files"]["metrics.jsonl"] and not payload_run["files"]["expert_load.jsonl"]
    with pytest.raises(ReportError, match="no such run directory"):
        build_payload([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="not a run directory"):
        build_payload([tmp_path / "empty"])


def test_samples_tokens_and_off_policy_parts(run: Path) -> None:
    (p,) = build_payload([run])["runs"]
    assert p["expert_load"]["steps"] == [1, 2, 3, 4]
    assert list(p["expert_load"]["layers"]) == ["1", "2"] and len(p["expert_load"]["layers"]["1"][0]) == 4
    assert [e["step"] for e in p["log_ratio"]] == [1, 2, 3, 4]
    assert p["staleness"] == {"source": "rollouts", "counts": {"0": 8, "1": 4, "2": 4}, "dropped": 4}
    step = p["rollouts"]["2"]
    assert [r["sample"] for r in step] == [0, 1, 2, 3]
    assert step[3]["dropped"].startswith("stale") and step[2]["unscored_reason"].startswith("math")
    assert "prompt" not in step[0] and p["prompts"]["p2"] == "<|user|>What is 2+2?<|assistant|>"
    traj = p["tokens"]["2"]["1"]  # sample 1: policy tokens, a tool turn, policy tokens
    tool = [bool(f & FLAG_TOOL) for f in traj["flags"]]
    assert tool == [False] * 5 + [True] * 3 + [False] * 2
    assert all(
        traj["rollout_logp"][i] is None and traj["log_ratio"][i] is None for i, t in enumerate(tool) if t
    )
    assert traj["log_ratio"][:2] == [0.36, -0.3]  # train - rollout, (0.3, -0.25) * 1.2 at step 2
    assert all(bool(f & FLAG_TRAINABLE) != t for f, t in zip(traj["flags"], tool, strict=True))
    rejected = [i for i, f in enumerate(traj["flags"]) if f & FLAG_TRAINABLE and not f & FLAG_ACCEPTED]
    assert rejected == [3, 4]
    assert traj["text"][5:8] == ["<tool>", "42", "</tool>"] and traj["version"] == [0] * 10


def test_rollouts_without_sample_and_staleness_from_metrics(tmp_path: Path) -> None:
    """Runs written before `sample` existed: the order within the step stands in."""
    run = write_run(tmp_path / "old", steps=2, tokens=False)
    path = run / "samples" / "rollouts.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "sample"}) + "\n" for r in records)
    )
    (p,) = build_payload([run])["runs"]
    assert [r["sample"] for r in p["rollouts"]["1"]] == [0, 1, 2, 3]
    path.unlink()
    (p,) = build_payload([run])["runs"]
    assert p["staleness"] == {"source": "metrics", "counts": {"0": 4.0, "1": 2.0}, "dropped": 2.0}


def test_budgets_spread_over_the_run(run: Path) -> None:
    assert spread([1, 2, 3], {1: 5, 2: 5, 3: 5}, 100) == [1, 2, 3]
    assert spread(list(range(10)), dict.fromkeys(range(10), 10), 30) == [0, 4, 9]
    assert spread(list(range(10)), dict.fromkeys(range(10), 10), 1) == [9]
    (p,) = build_payload([run], max_tokens=25, max_rollouts=8)["runs"]
    assert list(p["tokens"]) == ["1", "4"] and list(p["rollouts"]) == ["1", "4"]
    assert any("per-token samples of 2 of 4 steps are left out" in w for w in p["warnings"])
    assert any("rollouts of 2 of 4 steps are left out" in w for w in p["warnings"])


def test_run_names_and_signature(tmp_path: Path) -> None:
    a = write_run(tmp_path / "x" / "run", steps=2)
    b = write_run(tmp_path / "y" / "run", steps=2)
    assert run_names([a, b]) == ["x/run", "y/run"]
    assert run_names([a, a]) == ["x/run", "x/run (2)"]
    builder = PayloadBuilder([a])
    before = builder.signature()
    assert builder.signature() == before
    append_step(a, 3)
    assert builder.signature() != before
    assert builder.build()["runs"][0]["steps_done"] == 3


def test_page_is_self_contained_and_escaped(run: Path) -> None:
    path = run / "samples" / "rollouts.jsonl"
    record = json.loads(path.read_text().splitlines()[0]) | {
        "response": "</script><img src=x onerror=alert(1)>"
    }
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    payload = build_payload([run])
    page = render_page(payload)
    assert page.count("</script>") == 3  # options, data, the script; none from the data
    assert "<script src" not in page and '<link rel="stylesheet"' not in page
    assert "uPlot" in page and "window.RLSTACK" in page
    data = page.split('<script type="application/json" id="rlstack-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(data) == json.loads(to_json(payload)) and "<" not in data


def test_cli_report(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "report.html"
    assert main(["report", str(run), "-o", str(out)]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_cli_dashboard_stops_on_ctrl_c(run: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlstack.cli", "dashboard", str(run), "--port", "0", "--refresh-s", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, line
        with urllib.request.urlopen(url[0] + "data.json", timeout=10) as resp:
            assert json.loads(resp.read())["runs"][0]["name"] == "run_a"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)  # it stops in about a second; a loaded CI machine is slower
    finally:
        proc.kill()
    assert proc.returncode == 0 and "dashboard stopped" in out


def test_dashboard_server(run: Path) -> None:
    server = serve([run], port=0, refresh_s=1.0)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(server.url, timeout=10) as resp:
            page = resp.read().decode()
        assert '"live": {"refresh_s": 1.0, "data_url": "data.json"}' in page
        with urllib.request.urlopen(server.url + "data.json", timeout=10) as resp:
            etag = resp.headers["ETag"]
            payload = json.loads(resp.read())
        assert payload["runs"][0]["steps_done"] == 4 and etag == f'"{payload["signature"]}"'
        request = urllib.request.Request(server.url + "data.json", headers={"If-None-Match": etag})
        with pytest.raises(HTTPError) as unchanged:
            urllib.request.urlopen(request, timeout=10)
        assert unchanged.value.code == 304
        append_step(run, 5)
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.loads(resp.read())["runs"][0]["steps_done"] == 5
        with (run / "metrics.jsonl").open("a") as f:  # a bad line, then a good one: the last payload stays
            f.write("{bad\n" + json.dumps({"step": 6, "time": 1.0}) + "\n")
        with urllib.request.urlopen(server.url + "data.json", timeout=10) as resp:
            broken = json.loads(resp.read())
        assert broken["runs"][0]["steps_done"] == 5 and "metrics.jsonl: line 9 is not JSON" in broken["error"]
    finally:
        server.close()
