"""Prompt sources: files and datasets (through `datasets` / pyarrow) or the built-in task generators, and
`PromptSource`, the endless, checkpointable stream of training rows the driver draws batches from.

A row is a dict {"prompt_id", "prompt", "answer", "solution", "task", ...}: `prompt` is a string or, as in
TRL's conversational datasets, a list of {"role", "content"} messages (rlstack.data.prompts); `answer` and
`solution` may be None for files; any other column of the file rides along (reward functions receive it as
a keyword).
A malformed row is an error naming the file and the row (1-based line for JSON Lines), never a silently
empty prompt.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rlstack.data.config import ROW_FIELDS, DataConfig
from rlstack.data.prompts import message_list_problem, prompt_key
from rlstack.data.tasks import Split, generate_rows

DEFAULT_TASK_TRAIN_SIZE = 10_000


class DataError(ValueError):
    """A prompt file or its column mapping is wrong; the message names the file and the row."""


# ---- files -------------------------------------------------------------------------------------------


def load_rows(path: str | Path, columns: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file (`.jsonl`, `.json`), a Parquet file or a `save_to_disk` dataset directory.

    `columns` maps row fields to file columns, e.g. {"prompt": "question", "answer": "final"}.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        records, where = _read_dataset_dir(path), "row"
    elif path.suffix in (".jsonl", ".json"):
        records, where = _read_json(path)
    elif path.suffix == ".parquet":
        records, where = _read_parquet(path), "row"
    else:
        raise DataError(
            f"{path}: unsupported prompt file type '{path.suffix}'; use .jsonl/.json (JSON Lines), "
            ".parquet, or a directory written by datasets' save_to_disk"
        )
    return rows_from_records(records, columns, source=str(path), where=where)


def rows_from_records(
    records: Iterable[tuple[int, Mapping[str, Any]]],
    columns: Mapping[str, str] | None,
    source: str,
    where: str = "row",
) -> list[dict[str, Any]]:
    """(1-based number, record) pairs -> rows, validating each; errors say `source: <where> N: ...`."""
    columns = dict(columns or {})
    bad = sorted(set(columns) - set(ROW_FIELDS))
    if bad:
        raise DataError(
            f"{source}: column mapping has unknown field(s) {', '.join(bad)}; allowed: {ROW_FIELDS}"
        )
    mapping = {f: columns.get(f, f) for f in ROW_FIELDS}
    task = Path(source).stem
    rows: list[dict[str, Any]] = []
    seen_columns: set[Any] = set()
    for number, record in records:
        at = f"{source}: {where} {number}"
        if not isinstance(record, Mapping):
            raise DataError(
                f"{at}: expected an object with a '{mapping['prompt']}' field, got {record!r:.80}"
            )
        seen_columns.update(record)
        rows.append(_row(record, mapping, at=at, default_id=f"{task}-{number}", task=task))
    if not rows:
        raise DataError(f"{source}: no rows")
    for field, column in columns.items():
        if column not in seen_columns:  # a typo in the mapping would otherwise give all-None answers
            raise DataError(
                f"{source}: no row has column '{column}' (mapped to {field}); "
                f"columns: {', '.join(sorted(map(str, seen_columns)))}"
            )
    return rows


def _row(
    record: Mapping[str, Any], mapping: dict[str, str], at: str, default_id: str, task: str
) -> dict[str, Any]:
    prompt = record.get(mapping["prompt"])
    if isinstance(prompt, list | tuple):  # a conversation, as in TRL's conversational datasets
        prompt = [dict(m) if isinstance(m, Mapping) else m for m in prompt]
        problem = message_list_problem(prompt)
        if problem is not None:
            raise DataError(
                f"{at}: prompt column '{mapping['prompt']}': {problem}; a conversation is a list of "
                '{"role": ..., "content": "..."} messages'
            )
    elif not isinstance(prompt, str) or not prompt.strip():
        what = (
            "missing"
            if mapping["prompt"] not in record
            else f"not a non-empty string or a list of messages ({prompt!r:.60})"
        )
        hint = "" if mapping["prompt"] != "prompt" else "; map it with data.columns, e.g. {prompt: question}"
        raise DataError(f"{at}: prompt column '{mapping['prompt']}' is {what}{hint}")
    row: dict[str, Any] = {k: v for k, v in record.items() if k not in mapping.values()}
    row["prompt"] = prompt
    for field in ("answer", "solution"):
        value = record.get(mapping[field])
        if value is not None and not isinstance(value, str | int | float):
            raise DataError(
                f"{at}: {field} column '{mapping[field]}' must be text or a number, got {value!r:.60}"
            )
        row[field] = None if value is None else str(value)
    pid = record.get(mapping["prompt_id"])
    row["prompt_id"] = default_id if pid is None else str(pid)
    row.setdefault("task", task)
    return row


def _read_json(path: Path) -> tuple[Iterator[tuple[int, Any]], str]:
    """JSON Lines (numbered by line), or for `.json` also a JSON array (numbered by element)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON at line {e.lineno}: {e.msg}") from None
        return enumerate(records, start=1), "row"
    return _json_lines(path, text), "line"


def _json_lines(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    # split("\n"), not splitlines(): U+2028 and friends may appear raw inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {number}: not valid JSON ({e.msg} at column {e.colno})") from None


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read Parquet file ({e})") from None
    return enumerate(table.to_pylist(), start=1)


def _read_dataset_dir(path: Path) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise DataError(f"{path}: dataset has splits {', '.join(ds)}; expected 'train' or a single split")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return enumerate(ds, start=1)


# ---- splits ------------------------------------------------------------------------------------------


def task_rows(task: str, split: Split, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The built-in source: `n` generated problems of `task` (see rlstack.data.tasks)."""
    return generate_rows(task, split, n, seed)


def load_split(cfg: DataConfig, split: Split) -> list[dict[str, Any]]:
    """Training or held-out rows for a data config; the two never share a problem (for files: a prompt)."""
    if cfg.task is not None:
        n = cfg.heldout_size if split == "heldout" else (cfg.train_size or DEFAULT_TASK_TRAIN_SIZE)
        return task_rows(cfg.task, split, n, cfg.seed) if n else []
    assert cfg.path is not None
    rows = load_rows(cfg.path, cfg.columns)
    if cfg.heldout_path is not None:
        if split == "heldout":
            return load_rows(cfg.heldout_path, cfg.columns)[: cfg.heldout_size]
        heldout = {prompt_key(r["prompt"]) for r in load_rows(cfg.heldout_path, cfg.columns)}
    else:
        heldout = _heldout_prompts(rows, cfg.heldout_size)
        if split == "heldout":
            return _first_per_prompt([r for r in rows if prompt_key(r["prompt"]) in heldout])
    train = [r for r in rows if prompt_key(r["prompt"]) not in heldout]
    if not train:
        raise DataError(f"{cfg.path}: no training rows left after holding out {len(heldout)} prompts")
    return train[: cfg.train_size]


def _prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def _heldout_prompts(rows: list[dict[str, Any]], size: int) -> set[str]:
    """The `size` distinct prompts (by `prompt_key`) with the lowest hashes: a stable, order-independent
    choice."""
    distinct = sorted({prompt_key(r["prompt"]) for r in rows}, key=_prompt_hash)
    return set(distinct[:size])


def _first_per_prompt(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    first: dict[str, dict[str, Any]] = {}
    for r in rows:
        first.setdefault(prompt_key(r["prompt"]), r)
    return list(first.values())


# ---- the training stream -----------------------------------------------------------------------------


class PromptSource:
    """Endless, deterministic stream of training rows with a checkpointable cursor.

    Epoch e visits every row once, in the order of a permutation seeded by (seed, e); `state_dict()` holds
    (epoch, position, seed), so a resumed run draws exactly the batches the original would have.

    >>> src = PromptSource([{"prompt": str(i)} for i in range(5)], seed=0)
    >>> first = src.next_batch(3); state = src.state_dict(); rest = src.next_batch(4)
    >>> src.load_state_dict(state); src.next_batch(4) == rest
    True
    """

    def __init__(self, rows: list[dict[str, Any]], seed: int = 0, shuffle: bool = True) -> None:
        if not rows:
            raise DataError("PromptSource needs at least one row")
        self.rows = rows
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order: list[int] | None = None
        self._fingerprint = hashlib.sha256(
            "\n".join(str(r.get("prompt_id", r["prompt"])) for r in rows).encode()
        ).hexdigest()[:16]

    @classmethod
    def from_config(cls, cfg: DataConfig) -> PromptSource:
        return cls(load_split(cfg, "train"), seed=cfg.seed, shuffle=cfg.shuffle)

    def __len__(self) -> int:
        return len(self.rows)

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            self._order = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(f"rlstack/prompts/{self.seed}/{self.epoch}").shuffle(self._order)
        return self._order

    def next_batch(self, k: int) -> list[dict[str, Any]]:
        """The next `k` rows (copies), continuing into the next epoch when this one runs out."""
        batch = []
        for _ in range(k):
            if self.position == len(self.rows):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
            batch.append(dict(self.rows[self._epoch_order()[self.position]]))
            self.position += 1
        return batch

    @property
    def drawn(self) -> int:
        """Rows drawn so far, over all epochs (the data cursor as one number)."""
        return self.epoch * len(self.rows) + self.position

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_rows": len(self.rows),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["num_rows"] != len(self.rows) or state["fingerprint"] != self._fingerprint:
            raise DataError(
                f"cannot resume the prompt cursor: it was saved over {state['num_rows']} rows "
                f"(fingerprint {state['fingerprint']}), this source has {len(self.rows)} "
                f"(fingerprint {self._fingerprint}); the data config or files changed since the checkpoint"
            )
        if not 0 <= state["position"] <= len(self.rows):
            raise DataError(f"cannot resume the prompt cursor: position {state['position']} is out of range")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self._order = None
