"""The `data` config section: a built-in task generator or a prompt file, sizes and the shuffle seed."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from rlstack.config_base import StrictModel
from rlstack.data.tasks import TASKS

ROW_FIELDS = ("prompt", "answer", "solution", "prompt_id")


class DataConfig(StrictModel):
    """Where prompts come from. Set `task` (a built-in generator) or `path` (a file or dataset), not both."""

    task: str | None = "arithmetic"
    """Built-in task generator (rlstack.data.tasks): arithmetic, multistep, linear or puzzle. Setting `path`
    without `task` clears this default."""
    path: str | None = None
    """A prompt file or dataset: `*.jsonl` / `*.json` (JSON Lines), `*.parquet`, or a directory written by
    `datasets.Dataset.save_to_disk`. A row's prompt is a string or, as in TRL's conversational datasets, a
    list of {"role", "content"} messages (rendered with the policy's chat template)."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Row field -> column in the file, e.g. {prompt: question, answer: final}. Fields: prompt, answer,
    solution, prompt_id; unmapped fields are read from the column of the same name, if present."""
    heldout_path: str | None = None
    """A separate file of held-out prompts (same format and columns as `path`). None with `path`: the
    `heldout_size` rows whose prompt hashes lowest are held out of training."""
    train_size: int | None = Field(None, ge=1)
    """Training problems generated with `task` (None = 10,000); or at most this many rows of `path` (None =
    all)."""
    heldout_size: int = Field(256, ge=0)
    """Held-out problems for evaluation, disjoint from training."""
    seed: int = 0
    """Seed of task generation and of the per-epoch shuffle of training prompts."""
    shuffle: bool = True
    """Visit training prompts in a new seeded order each epoch (False: file/generation order)."""
    chat_template: bool = True
    """Render each prompt with the policy tokenizer's chat template (a string prompt is one user message),
    ending with the assistant's generation prompt: what an instruction-tuned model was trained on. False
    feeds string prompts to the policy verbatim (a base model, or prompts already formatted); conversations
    then cannot be rendered and are refused."""

    @model_validator(mode="before")
    @classmethod
    def _path_replaces_default_task(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("path") is not None and "task" not in data:
            data = {**data, "task": None}
        return data

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if (self.task is None) == (self.path is None):
            raise ValueError(
                "set exactly one of data.task (a built-in generator: "
                f"{', '.join(sorted(TASKS))}) or data.path (a jsonl/parquet file or a saved dataset dir)"
            )
        if self.task is not None:
            if self.task not in TASKS:
                raise ValueError(
                    f"unknown data.task '{self.task}'; built-in tasks: {', '.join(sorted(TASKS))}"
                )
            if self.columns:
                raise ValueError("data.columns maps file columns; it needs data.path, not data.task")
            if self.heldout_path is not None:
                raise ValueError("data.heldout_path needs data.path; a task generates its own held-out split")
        bad = sorted(set(self.columns) - set(ROW_FIELDS))
        if bad:
            raise ValueError(
                f"data.columns: unknown field(s) {', '.join(bad)}; allowed: {', '.join(ROW_FIELDS)}"
            )
        return self
