"""Judge prompts: templates from `rlstack/rewards/templates/*.txt` (or a user's file), filled with text that
is cleaned and bounded first, so no completion (empty, binary, a megabyte long) can break a judge call.

A template is the judge's user message with `{name}` fields; `system.txt` is its system message.

    >>> render("Q: {question}\\nA: {response}", question="1+1?", response="{2}")
    'Q: 1+1?\\nA: {2}'
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from rlstack.rewards.extract import completion_text

MAX_FIELD_CHARS = 1200
"""Longer fields keep their head and tail (the worker still cuts a prompt that exceeds the context)."""
_FIELD = re.compile(r"\{([a-z_]+)\}")
# Role markers of the policy's chat template (rlstack's <|user|>, ChatML's <|im_start|>user).
_ROLE = re.compile(r"<\|(system|user|assistant|tool)\|>|<\|im_start\|>(system|user|assistant|tool)\n?")
_SPECIAL = re.compile(r"<\|[a-z_]+\|>|</s>|<s>|<pad>")


class TemplateError(ValueError):
    """A judge template is missing, unreadable or has fields the judge cannot fill."""


@lru_cache(maxsize=32)
def load_template(name_or_path: str) -> str:
    """A built-in template by name (`pointwise`, `pairwise`, `metarm`, `metarm_self`, `system`) or a file."""
    builtin = files("rlstack.rewards").joinpath("templates", f"{name_or_path}.txt")
    if "/" not in name_or_path and not name_or_path.endswith(".txt") and builtin.is_file():
        return builtin.read_text()
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        names = sorted(p.name[:-4] for p in files("rlstack.rewards").joinpath("templates").iterdir())
        raise TemplateError(
            f"judge template '{name_or_path}' is neither built in ({', '.join(names)}) nor a file"
        )
    return path.read_text()


def check_template(template: str, fields: set[str], name: str) -> None:
    """Every `{field}` of `template` must be one the judge fills."""
    used = set(_FIELD.findall(template))
    unknown = used - fields
    if unknown:
        raise TemplateError(
            f"judge template '{name}' uses unknown field(s) {sorted(unknown)}; available: {sorted(fields)}"
        )


def render(template: str, **values: str) -> str:
    """Fill `{name}` fields in one pass (values are inserted verbatim: braces in them are not fields)."""
    return _FIELD.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def clean_text(value: Any, limit: int = MAX_FIELD_CHARS) -> str:
    """Text a judge can read: chat messages flattened, lone surrogates and NULs replaced, special tokens
    defused, at most `limit` characters (head and tail kept)."""
    if isinstance(value, str) or value is None:
        text = value or ""
    else:
        try:
            text = completion_text(value)
        except TypeError:  # not text at all: judge its repr rather than fail
            text = str(value)
    text = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    text = _SPECIAL.sub(lambda m: m.group(0).replace("|", "¦"), text)  # no chat-control tokens inside
    if len(text) > limit:
        half = limit // 2
        text = f"{text[:half]}\n[... {len(text) - limit} characters cut ...]\n{text[-half:]}"
    return text.strip()


def question_text(prompt: Any) -> str:
    """The task as the user asked it: the last user turn of a rendered chat prompt or message list."""
    if isinstance(prompt, list):  # TRL conversational: [{"role": ..., "content": ...}, ...]
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return clean_text(users[-1] if users else completion_text(prompt))
    text = prompt if isinstance(prompt, str) else str(prompt)
    parts = _ROLE.split(text)
    # split() yields [before, role1, role2, content, role1, role2, content, ...] (one role group is None)
    turns = [(parts[i] or parts[i + 1], parts[i + 2]) for i in range(1, len(parts) - 2, 3)]
    users = [content for role, content in turns if role == "user"]
    if users:
        return clean_text(users[-1].replace("<|im_end|>", ""))
    return clean_text(text)


def conversation(user: str, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system.strip()}] if system else []
    return [*messages, {"role": "user", "content": user.strip()}]
