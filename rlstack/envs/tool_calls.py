"""Tool calls in generated text, their execution, and the tokens of their results.

Format: Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, the format of the
Qwen2.5/Qwen3, Hermes and SmolLM3 chat templates (and of rlstack's tiny tokenizer). One assistant turn
may hold several calls; a turn without one ends the episode.

Results go back as chat `tool` messages, and their tokens come from the chat template by TRL's suffix
trick (`tool_suffix_ids`): render a dummy conversation that ends in an assistant tool call with and
without the tool messages (plus the next assistant header), cut the former after its EOS, and keep what
the latter adds. The history is never re-rendered: the next turn's prompt is the previous ids + these.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rlstack.envs.sandbox import SandboxError

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call the model wrote; `error` is set when the block could not be read as a call."""

    name: str
    arguments: dict[str, Any]
    error: str | None = None

    def message(self) -> dict[str, Any]:
        """The call as an OpenAI/TRL `tool_calls` entry."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolOutcome:
    """What one call returned, as the model will read it."""

    name: str
    content: str
    error: bool = False
    """The call failed (unknown tool, bad arguments, the tool raised, unreadable call, time-out)."""
    timeout: bool = False
    seconds: float = 0.0

    def message(self) -> dict[str, Any]:
        return {"role": "tool", "name": self.name, "content": self.content}


def format_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """A call as the model writes it (compact JSON), e.g. for demonstrations.

    >>> format_tool_call("python", {"code": "print(2*3)"})
    '<tool_call>{"name":"python","arguments":{"code":"print(2*3)"}}</tool_call>'
    """
    body = json.dumps({"name": name, "arguments": dict(arguments)}, separators=(",", ":"))
    return f"<tool_call>{body}</tool_call>"


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every complete `<tool_call>` block of an assistant turn, in order. A block that is not a JSON object
    with a string `name` and an object `arguments` becomes a call with `error` set (answered as an error).

    >>> [c.name for c in parse_tool_calls('a <tool_call>{"name":"f","arguments":{}}</tool_call>')]
    ['f']
    >>> parse_tool_calls("<tool_call>{oops}</tool_call>")[0].error
    'the tool call is not valid JSON: Expecting property name enclosed in double quotes'
    """
    calls = []
    for block in _TOOL_CALL.findall(text):
        try:
            data = json.loads(block)
        except json.JSONDecodeError as e:
            calls.append(ToolCall("unknown", {}, f"the tool call is not valid JSON: {e.msg}"))
            continue
        name = data.get("name") if isinstance(data, dict) else None
        arguments = data.get("arguments", {}) if isinstance(data, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, dict):
            calls.append(
                ToolCall(str(name or "unknown"), {}, 'a tool call is {"name": str, "arguments": {...}}')
            )
            continue
        calls.append(ToolCall(name, arguments))
    return calls


def call_tool(tools: Mapping[str, Callable[..., Any]], call: ToolCall, timeout_s: float) -> ToolOutcome:
    """Run one call with a deadline. Failures answer `{'error': '...'}` (TRL's format); a call past
    `timeout_s` answers a time-out error and is abandoned (its thread finishes on its own). A
    `SandboxError` (the sandbox itself failed) is raised: the episode cannot be scored fairly."""
    start = time.perf_counter()

    def outcome(content: str, error: bool = False, timeout: bool = False) -> ToolOutcome:
        return ToolOutcome(call.name, content, error, timeout, time.perf_counter() - start)

    if call.error is not None:
        return outcome(str({"error": call.error}), error=True)
    tool = tools.get(call.name)
    if tool is None:
        return outcome(str({"error": f"Tool {call.name} not found."}), error=True)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = tool(**call.arguments)
        except Exception as e:  # the tool's own failure is the model's feedback, as in TRL
            box["error"] = e

    thread = threading.Thread(target=target, name=f"rlstack-tool-{call.name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return outcome(str({"error": f"the tool call timed out after {timeout_s:g} s"}), True, True)
    if isinstance(box.get("error"), SandboxError):  # the sandbox broke, not the call: not the model's doing
        raise box["error"]
    if "error" in box:
        return outcome(str({"error": str(box["error"])}), error=True)
    return outcome(str(box.get("value")))


def tool_suffix_ids(tokenizer: Any, results: list[ToolOutcome]) -> list[int]:
    """The tokens that follow an assistant turn ending in tool calls: the tool messages and the next
    assistant header, from the chat template (TRL's suffix trick, see the module docstring)."""
    dummy = [
        {"role": "user", "content": "dummy"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": results[0].name, "arguments": {}}}],
        },
    ]
    prefix = tokenizer.apply_chat_template(
        dummy, add_generation_prompt=False, tokenize=True, return_dict=False
    )
    full = tokenizer.apply_chat_template(
        dummy + [r.message() for r in results], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    eos = [i for i, token in enumerate(prefix) if token == tokenizer.eos_token_id]
    if eos:  # templates that write "<eos>\n" after a turn: cut at the EOS the model itself generates
        prefix = prefix[: eos[-1] + 1]
    if list(full[: len(prefix)]) != list(prefix):
        raise ValueError(
            "the chat template re-renders earlier turns when tool messages follow (the conversation without "
            "them is not a prefix of the one with them); multi-turn token-in/token-out needs a template that "
            "only appends"
        )
    return list(full[len(prefix) :])


def demonstration_tokens(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """A worked episode (assistant turns with `tool_calls`, tool results) as response token ids and loss
    mask, built exactly as a rollout builds them: each assistant turn as the model would write it
    (content, then its calls, then EOS; mask 1), tool results by `tool_suffix_ids` (mask 0)."""
    ids: list[int] = []
    mask: list[int] = []
    pending: list[ToolOutcome] = []
    for message in messages:
        if message["role"] == "tool":
            pending.append(ToolOutcome(str(message.get("name", "tool")), str(message["content"])))
            continue
        if message["role"] != "assistant":
            raise ValueError(f"a demonstration holds assistant and tool messages, not {message['role']!r}")
        if pending:
            suffix = tool_suffix_ids(tokenizer, pending)
            ids, mask, pending = ids + suffix, mask + [0] * len(suffix), []
        calls = "".join(
            format_tool_call(c["function"]["name"], c["function"]["arguments"])
            for c in message.get("tool_calls") or []
        )
        turn = [*tokenizer.encode(str(message.get("content") or "") + calls, add_special_tokens=False)]
        turn.append(tokenizer.eos_token_id)
        ids, mask = ids + turn, mask + [1] * len(turn)
    if pending:
        raise ValueError("a demonstration must end with an assistant turn, not a tool result")
    return ids, mask
