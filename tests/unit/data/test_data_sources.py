"""Prompt files (JSONL, Parquet, saved datasets), malformed rows, DataConfig, splits, the resumable cursor."""

from __future__ import annotations

import doctest
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import rlstack.data.sources as sources_module
from rlstack.data import DataConfig, DataError, PromptSource, load_rows, load_split

RECORDS = [
    {"question": "What is 2+2?", "final": 4, "level": "easy"},
    {"question": "What is 3*3?", "final": "9", "level": "easy", "id": "q2"},
    {"question": "Solve 2*x=8 for x.", "final": "4", "level": "hard"},
]
MAPPING = {"prompt": "question", "answer": "final"}


def _jsonl(path: Path, records: list[Any], raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    for number, text in (raw_lines or {}).items():
        lines.insert(number - 1, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_with_column_mapping_keeps_extra_columns(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "qa.jsonl", RECORDS)
    rows = load_rows(path, MAPPING)
    assert rows[0] == {
        "prompt": "What is 2+2?",
        "answer": "4",  # numbers become text
        "solution": None,
        "prompt_id": "qa-1",  # file stem + row number when there is no id column
        "task": "qa",
        "level": "easy",  # extra columns ride along for reward functions
    }
    assert [r["answer"] for r in rows] == ["4", "9", "4"]
    assert rows[1]["id"] == "q2"
    assert load_rows(path, {**MAPPING, "prompt_id": "id"})[1]["prompt_id"] == "q2"


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", RECORDS, raw_lines={3: "", 4: '{"question": "oops",'})
    with pytest.raises(DataError, match=r"bad\.jsonl: line 4: not valid JSON"):
        load_rows(path, MAPPING)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"final": "1"}, "prompt column 'question' is missing"),
        ({"question": "", "final": "1"}, "prompt column 'question' is not a non-empty string"),
        ({"question": "   ", "final": "1"}, "prompt column 'question' is not a non-empty string"),
        ({"question": None, "final": "1"}, "prompt column 'question' is not a non-empty string"),
        ({"question": ["a", "list"], "final": "1"}, "prompt column 'question': message 1 is not an object"),
        ({"question": 7, "final": "1"}, "prompt column 'question' is not a non-empty string or a list"),
        ({"question": "ok", "final": {"a": 1}}, "answer column 'final' must be text or a number"),
        (["not", "an", "object"], "expected an object"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, record: Any, message: str) -> None:
    path = _jsonl(tmp_path / "rows.jsonl", [*RECORDS[:2], record])
    with pytest.raises(DataError, match=rf"rows\.jsonl: line 3: {message}"):
        load_rows(path, {"prompt": "question", "answer": "final"} if isinstance(record, dict) else MAPPING)


def test_missing_mapped_column_and_unmapped_prompt_hint(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "qa.jsonl", RECORDS)
    with pytest.raises(
        DataError, match=r"qa\.jsonl: no row has column 'solution_text' \(mapped to solution\)"
    ):
        load_rows(path, {**MAPPING, "solution": "solution_text"})
    with pytest.raises(DataError, match=r"prompt column 'prompt' is missing; map it with data.columns"):
        load_rows(path)


def test_parquet_and_saved_dataset(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{**r, "final": str(r["final"])} for r in RECORDS]  # one type per Parquet column
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "qa.parquet")
    parquet_rows = load_rows(tmp_path / "qa.parquet", MAPPING)
    assert [r["prompt"] for r in parquet_rows] == [r["question"] for r in RECORDS]

    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    assert [r["answer"] for r in load_rows(tmp_path / "ds", MAPPING)] == ["4", "9", "4"]

    bad = [*records, {"question": "", "final": "1", "level": "x", "id": None}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: row 4: prompt column 'question'"):
        load_rows(tmp_path / "bad.parquet", MAPPING)
    datasets.DatasetDict(
        {"a": datasets.Dataset.from_list(records), "b": datasets.Dataset.from_list(records)}
    ).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="splits a, b; expected 'train'"):
        load_rows(tmp_path / "dd", MAPPING)


def test_json_array_and_raw_line_separators(tmp_path: Path) -> None:
    (tmp_path / "arr.json").write_text(json.dumps([RECORDS[0], {"question": 3}]))
    with pytest.raises(DataError, match=r"arr\.json: row 2: prompt column 'question' is not a non-empty"):
        load_rows(tmp_path / "arr.json", MAPPING)
    # U+2028 may appear unescaped inside a JSON string: it must not split a line or shift line numbers.
    path = tmp_path / "sep.jsonl"
    path.write_text('{"prompt": "a\u2028b"}\n{"prompt": ""}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"sep\.jsonl: line 2: prompt column 'prompt' is not a non-empty"):
        load_rows(path)
    path.write_text('{"prompt": "a\u2028b"}\n', encoding="utf-8")
    assert load_rows(path)[0]["prompt"] == "a\u2028b"


def test_unsupported_or_missing_file(tmp_path: Path) -> None:
    (tmp_path / "qa.csv").write_text("question\nhi\n")
    with pytest.raises(DataError, match=r"unsupported prompt file type '.csv'"):
        load_rows(tmp_path / "qa.csv")
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "nope.jsonl")


def test_data_config_validation() -> None:
    assert DataConfig().task == "arithmetic"
    cfg = DataConfig(path="qa.jsonl", columns=MAPPING)
    assert cfg.task is None  # setting a path clears the default task
    with pytest.raises(ValidationError, match=r"set exactly one of data.task"):
        DataConfig(task="linear", path="qa.jsonl")
    with pytest.raises(ValidationError, match=r"set exactly one of data.task"):
        DataConfig(task=None)
    with pytest.raises(ValidationError, match=r"unknown data.task 'algebra'; built-in tasks: addition, "):
        DataConfig(task="algebra")
    with pytest.raises(ValidationError, match=r"data.columns maps file columns; it needs data.path"):
        DataConfig(columns=MAPPING)
    with pytest.raises(ValidationError, match=r"unknown field.s. question; allowed: prompt, answer"):
        DataConfig(path="qa.jsonl", columns={"question": "q"})
    with pytest.raises(ValidationError, match="extra"):
        DataConfig(tsk="linear")  # type: ignore[call-arg]


def test_task_splits_from_config() -> None:
    cfg = DataConfig(task="linear", train_size=500, heldout_size=64, seed=2)
    train, heldout = load_split(cfg, "train"), load_split(cfg, "heldout")
    assert (len(train), len(heldout)) == (500, 64)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}


def test_file_heldout_is_disjoint_and_stable(tmp_path: Path) -> None:
    records = [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(200)]
    records += records[:50]  # duplicated prompts must all land on one side
    path = _jsonl(tmp_path / "p.jsonl", records)
    cfg = DataConfig(path=str(path), heldout_size=20)
    train, heldout = load_split(cfg, "train"), load_split(cfg, "heldout")
    assert len(heldout) == 20 and len(train) == 250 - sum(
        1 for r in records if r["prompt"] in {h["prompt"] for h in heldout}
    )
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    shuffled = _jsonl(tmp_path / "q.jsonl", records[::-1])  # order of the file does not matter
    assert {r["prompt"] for r in load_split(DataConfig(path=str(shuffled), heldout_size=20), "heldout")} == {
        r["prompt"] for r in heldout
    }
    assert len(load_split(DataConfig(path=str(path), heldout_size=20, train_size=7), "train")) == 7
    separate = _jsonl(tmp_path / "h.jsonl", records[:5])
    cfg = DataConfig(path=str(path), heldout_path=str(separate))
    assert len(load_split(cfg, "heldout")) == 5 and len(load_split(cfg, "train")) == 250 - 10


def test_prompt_source_epochs_and_exact_resume() -> None:
    rows = [{"prompt_id": str(i), "prompt": f"p{i}"} for i in range(10)]
    src = PromptSource(rows, seed=7)
    epoch0 = [r["prompt_id"] for r in src.next_batch(10)]
    assert sorted(epoch0) == sorted(r["prompt_id"] for r in rows) and epoch0 != [str(i) for i in range(10)]
    src.next_batch(3)
    state = json.loads(json.dumps(src.state_dict()))  # survives a JSON round trip (trainer_state/)
    assert state["epoch"] == 1 and state["position"] == 3
    expected = [r["prompt_id"] for r in src.next_batch(25)]

    resumed = PromptSource(rows, seed=0)
    resumed.load_state_dict(state)
    assert [r["prompt_id"] for r in resumed.next_batch(25)] == expected
    again = PromptSource(rows, seed=7)
    assert [r["prompt_id"] for r in again.next_batch(10)] == epoch0
    assert [r["prompt_id"] for r in PromptSource(rows, shuffle=False).next_batch(3)] == ["0", "1", "2"]


def test_prompt_source_refuses_other_data_and_returns_copies() -> None:
    rows = [{"prompt_id": str(i), "prompt": f"p{i}"} for i in range(10)]
    src = PromptSource(rows)
    batch = src.next_batch(2)
    batch[0]["prompt"] = "mutated"
    assert all(r["prompt"] != "mutated" for r in rows)
    with pytest.raises(DataError, match=r"saved over 10 rows .* this source has 9"):
        PromptSource(rows[:9]).load_state_dict(src.state_dict())
    cfg_src = PromptSource.from_config(DataConfig(train_size=100))
    assert len(cfg_src) == 100 and len(cfg_src.next_batch(150)) == 150


def test_doctests() -> None:
    assert doctest.testmod(sources_module).failed == 0
