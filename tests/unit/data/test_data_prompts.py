"""Conversational prompts (TRL's format): loading and validating message lists, held-out splits over them,
rendering with the policy's chat template, and the rollout `Prompt` that carries the original prompt."""

from __future__ import annotations

import doctest
import json
from pathlib import Path
from typing import Any

import pytest

import rlstack.data.prompts as prompts_module
from rlstack.data import DataConfig, DataError, load_rows, load_split
from rlstack.data.prompts import PROMPT_COLUMN, render_prompt, reward_prompt, rollout_prompt
from rlstack.model.tokenizer import build_tokenizer

CHAT = [
    {"role": "system", "content": "Answer with a boxed number."},
    {"role": "user", "content": "What is 2+3?"},
]


def _jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_conversational_rows_load_beside_string_rows(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "chat.jsonl",
        [
            {"prompt": CHAT, "solution": "5", "level": 1},
            {"prompt": "What is 1+1?", "solution": "2", "level": 2},
        ],
    )
    rows = load_rows(path)
    assert rows[0]["prompt"] == CHAT and rows[0]["solution"] == "5" and rows[0]["level"] == 1
    assert rows[1]["prompt"] == "What is 1+1?"


def test_conversational_rows_from_parquet_and_a_mapped_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT, "final": "5"}]), path)
    rows = load_rows(path, {"prompt": "messages", "answer": "final"})
    assert rows[0]["prompt"] == CHAT and rows[0]["answer"] == "5" and "messages" not in rows[0]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "a conversation must be a non-empty list of messages"),
        (["What is 2+3?"], r"message 1 is not an object with 'role' and 'content'"),
        ([{"role": "user"}], "message 1 has no 'content'"),
        ([{"content": "hi"}], r"message 1 needs a 'role' \(a non-empty string\)"),
        (
            [CHAT[0], {"role": "user", "content": ["a", "b"]}],
            "message 2: 'content' must be a string, got list",
        ),
        ([{"role": "user", "content": "  "}], "every message's content is empty"),
    ],
)
def test_bad_message_lists_name_file_row_and_message(tmp_path: Path, prompt: Any, message: str) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": CHAT}, {"prompt": prompt}])
    with pytest.raises(DataError, match=rf"bad\.jsonl: line 2: prompt column 'prompt': {message}"):
        load_rows(path)


def test_heldout_split_over_conversations_is_disjoint(tmp_path: Path) -> None:
    records = [{"prompt": [{"role": "user", "content": f"What is {i}+1?"}]} for i in range(40)]
    records += records[:10]  # a repeated conversation lands on one side only
    cfg = DataConfig(path=str(_jsonl(tmp_path / "c.jsonl", records)), heldout_size=5)
    train, heldout = load_split(cfg, "train"), load_split(cfg, "heldout")
    assert len(heldout) == 5
    as_text = {json.dumps(r["prompt"]) for r in heldout}
    assert not {json.dumps(r["prompt"]) for r in train} & as_text
    assert len(train) == 50 - sum(json.dumps(r["prompt"]) in as_text for r in records)


def test_render_prompt_with_the_policy_chat_template() -> None:
    tok = build_tokenizer()
    assert render_prompt(tok, "What is 2+3?") == "<|user|>What is 2+3?<|assistant|>"
    assert (
        render_prompt(tok, CHAT) == "<|system|>Answer with a boxed number.<|user|>What is 2+3?<|assistant|>"
    )


def test_rollout_prompt_keeps_the_original_prompt_for_the_reward_call() -> None:
    tok = build_tokenizer()
    row = {"prompt_id": "r1", "prompt": CHAT, "answer": "5", "task": "chat"}
    prompt = rollout_prompt(tok, row, "0:0:r1")
    assert prompt.prompt_id == "0:0:r1" and prompt.text.endswith("<|assistant|>")
    assert prompt.columns == {PROMPT_COLUMN: CHAT, "answer": "5", "task": "chat"}
    original, columns = reward_prompt(prompt.columns, prompt.text)
    assert original == CHAT and columns == {"answer": "5", "task": "chat"}
    # a rollout not made from a data row: the rendered text stands in for the prompt
    assert reward_prompt({"answer": "5"}, "<|user|>q<|assistant|>") == (
        "<|user|>q<|assistant|>",
        {"answer": "5"},
    )


def test_doctests() -> None:
    assert doctest.testmod(prompts_module).failed == 0
