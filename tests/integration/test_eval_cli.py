"""`rlstack eval` on a user's own data: the config's data source (a JSONL file, its held-out prompts) and its
rewards (a plugin reading a column of that file), not a built-in task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlstack.cli import main
from rlstack.data.config import DataConfig
from rlstack.data.sources import load_split

pytestmark = pytest.mark.vllm


def test_eval_scores_the_configs_heldout_rows_with_its_rewards(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "rows.jsonl"
    rows = [{"question": f"What is {i}+{i}?", "label": "yes" if i % 3 == 0 else "no"} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = {"path": str(data), "columns": {"prompt": "question"}, "heldout_size": 9}
    config = {
        "data": section,
        "rewards": [{"import_path": "toy_rewards:label_is_yes"}],
        "rollout": {"sampling": {"max_tokens": 8}},
        "eval": {"samples": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["eval", str(tiny_checkpoint), "--config", str(path)]) == 0
    out = capsys.readouterr().out
    heldout = load_split(DataConfig.model_validate(section), "heldout")
    expected = sum(r["label"] == "yes" for r in heldout) / len(heldout)
    assert len(heldout) == 9 and 0.0 < expected < 1.0  # the file's held-out split decides the accuracy
    assert "held-out accuracy (9 problems)" in out
    for mode in ("greedy", "sampled"):
        assert f"{mode:<10}{expected:>10.1%}" in out, out

    # --problems and key=value overrides apply on top of the config
    assert main(["eval", str(tiny_checkpoint), "--config", str(path), "--problems", "4"]) == 0
    assert "held-out accuracy (4 problems)" in capsys.readouterr().out
