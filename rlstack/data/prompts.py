"""Prompts as datasets give them, as in TRL: a string (one user turn) or a conversation, a list of
{"role", "content"} messages. Rendering them with the policy's chat template, and the rollout `Prompt` of a
row, which carries the original prompt to the reward call.

    >>> message_list_problem([{"role": "user", "content": "2+2?"}]) is None
    True
    >>> message_list_problem([{"role": "user", "text": "2+2?"}])
    "message 1 has no 'content'"
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rlstack.types import Prompt

PromptValue = str | list[dict[str, Any]]
"""A row's prompt: a string, or a conversation (a list of {"role", "content", ...} messages)."""

PROMPT_COLUMN = "prompt"
"""Key of a rollout `Prompt`'s columns holding the row's original prompt (string or messages): it reaches
reward plugins as `prompts`, never as a column of its own (as TRL leaves `prompt` out of the columns)."""

ROW_ONLY = ("prompt_id",)
"""Row fields that are not reward columns: the prompt id reaches the reward call as `sample_ids`."""


def message_list_problem(value: Any) -> str | None:
    """What is wrong with a conversational prompt, or None: a non-empty list of messages, each a mapping
    with a non-empty string `role` and a string `content`, not all contents blank."""
    if not isinstance(value, list) or not value:
        return "a conversation must be a non-empty list of messages"
    for number, message in enumerate(value, start=1):
        if not isinstance(message, Mapping):
            return f"message {number} is not an object with 'role' and 'content' ({message!r:.60})"
        if not isinstance(message.get("role"), str) or not message["role"]:
            return f"message {number} needs a 'role' (a non-empty string)"
        if "content" not in message:
            return f"message {number} has no 'content'"
        if not isinstance(message["content"], str):
            return f"message {number}: 'content' must be a string, got {type(message['content']).__name__}"
    if not any(m["content"].strip() for m in value):
        return "every message's content is empty"
    return None


def is_conversational(prompt: Any) -> bool:
    """Whether a prompt is a conversation (a list of messages) rather than a string."""
    return isinstance(prompt, list)


def prompt_key(prompt: PromptValue) -> str:
    """A string that identifies a prompt (the string itself, or a conversation's canonical JSON)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def render_prompt(
    tokenizer: Any,
    prompt: PromptValue,
    tools: list[dict[str, Any]] | None = None,
    chat_template: bool = True,
) -> str:
    """The policy's input text: the chat template over the conversation (a string is one user message),
    ending with the generation prompt of the assistant's turn. `tools`: the JSON schemas of the episode's
    tools, for templates that render them (the tiny model's does not). Without `chat_template`
    (`data.chat_template: false`) a string prompt is the text itself."""
    if not chat_template:
        if not isinstance(prompt, str):
            raise ValueError(
                "data.chat_template is false, so prompts are fed verbatim, but this prompt is a conversation "
                "(a list of messages), which only a chat template can render"
            )
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)


def rollout_prompt(
    tokenizer: Any,
    row: Mapping[str, Any],
    prompt_id: str,
    tools: list[dict[str, Any]] | None = None,
    chat_template: bool = True,
) -> Prompt:
    """The rollout `Prompt` of a data row: its rendered text (with `tools`' schemas; verbatim without
    `chat_template`), and as columns the row's other fields plus its original prompt under `PROMPT_COLUMN`
    (for the reward call)."""
    columns = {k: v for k, v in row.items() if k not in ROW_ONLY}
    text = render_prompt(tokenizer, row["prompt"], tools, chat_template)
    return Prompt(prompt_id=prompt_id, text=text, columns=columns)


def reward_prompt(columns: Mapping[str, Any], rendered: str) -> tuple[PromptValue, dict[str, Any]]:
    """A rollout's (original prompt, reward columns): the prompt kept under `PROMPT_COLUMN` (else the
    rendered text, for rollouts not made from a data row) and the other columns."""
    prompt = columns.get(PROMPT_COLUMN, rendered)
    return prompt, {k: v for k, v in columns.items() if k != PROMPT_COLUMN}


def with_observation(prompt: PromptValue, observation: str) -> PromptValue:
    """The prompt with an environment's `reset()` observation appended to its last user message (TRL's
    rule), leaving the original untouched."""
    if isinstance(prompt, str):
        return prompt + observation
    last = prompt[-1]
    return [*prompt[:-1], {**last, "content": str(last.get("content", "")) + observation}]


def prompt_ids(prompt: Prompt, tokenizer: Any) -> list[int]:
    if prompt.token_ids is not None:
        return list(prompt.token_ids)
    if not prompt.text:
        raise ValueError(f"prompt {prompt.prompt_id!r} has neither text nor token_ids")
    return tokenizer.encode(prompt.text, add_special_tokens=False)


def observation_prompt_ids(
    prompt: Prompt, observation: str, tokenizer: Any, tools: list[dict[str, Any]] | None
) -> list[int]:
    """The prompt re-rendered (with the tools' schemas) and a `reset()` observation appended to its last
    user message."""
    if PROMPT_COLUMN not in prompt.columns:
        raise ValueError(
            f"prompt {prompt.prompt_id!r}: the environment's reset() returned an observation, but the prompt "
            f"has no '{PROMPT_COLUMN}' column to append it to"
        )
    text = render_prompt(tokenizer, with_observation(prompt.columns[PROMPT_COLUMN], observation), tools)  # type: ignore[arg-type]
    return tokenizer.encode(text, add_special_tokens=False)
