"""The environment convention (TRL's environment_factory), tool calls and the episode record, without an
engine: turns are fed to `Episode` / `EpisodeRunner` by hand, tools really run."""

from __future__ import annotations

import time
from typing import Any

import pytest

from rlstack.envs.config import EnvConfig
from rlstack.envs.environment import EnvError, check_environment, tool_methods, tool_schemas
from rlstack.envs.registry import env_factory, get_env, list_envs
from rlstack.envs.tool_calls import (
    ToolCall,
    ToolOutcome,
    call_tool,
    demonstration_tokens,
    format_tool_call,
    parse_tool_calls,
    tool_suffix_ids,
)
from rlstack.model.tokenizer import build_tokenizer
from rlstack.rollout.multiturn import Episode, EpisodeRunner, Turn, episode_metrics
from rlstack.rollout.worker import Prompt

TOKENIZER = build_tokenizer()


class Counter:
    """A TRL-style environment: reset, one typed and documented tool, a private helper, get_reward."""

    def reset(self, **row: Any) -> str | None:
        self.total = int(row.get("start", 0))
        return None

    def add(self, n: int) -> int:
        """Add to the running total.

        Args:
            n: How much to add.
        """
        self.total = self._bump(n)
        return self.total

    def slow(self, seconds: float) -> str:
        """Sleep.

        Args:
            seconds: How long.
        """
        time.sleep(seconds)
        return "done"

    def _bump(self, n: int) -> int:
        return self.total + n

    def get_reward(self) -> float:
        return float(self.total)


class Undocumented:
    def reset(self, **row: Any) -> None:
        pass

    def tool(self, x):  # type: ignore[no-untyped-def]
        return x


def test_tools_are_the_public_methods_with_schemas_from_hints_and_docstrings() -> None:
    env = Counter()
    assert sorted(tool_methods(env)) == ["add", "slow"]
    schema = {s["function"]["name"]: s["function"] for s in tool_schemas(env)}["add"]
    assert schema["parameters"]["properties"]["n"] == {"type": "integer", "description": "How much to add."}
    with pytest.raises(EnvError, match=r"Undocumented.*tool 'tool' has no usable schema"):
        check_environment(Undocumented())
    with pytest.raises(EnvError, match="no callable reset"):
        check_environment(object())


def test_registry_import_path_and_options_are_checked_at_start() -> None:
    assert "python_tool" in list_envs()
    assert get_env("python_tool").__name__ == "PythonTool"
    with pytest.raises(EnvError, match="unknown environment 'nope'; available: python_tool"):
        get_env("nope")
    with pytest.raises(EnvError, match="unknown option 'time_limit'; options: time_limit_s"):
        env_factory(EnvConfig(name="python_tool", options={"time_limit": 3}))
    with pytest.raises(EnvError, match="cannot import module 'no_such_module'"):
        env_factory(EnvConfig(import_path="no_such_module:Env"))
    factory = env_factory(EnvConfig(import_path=f"{__name__}:Counter"))
    assert isinstance(factory(), Counter)


def test_tool_calls_parse_run_and_fail_as_trl_does() -> None:
    text = "x " + format_tool_call("add", {"n": 2}) + format_tool_call("add", {"n": "3"}) + "<tool_call>{"
    calls = parse_tool_calls(text)
    assert [c.arguments for c in calls] == [{"n": 2}, {"n": "3"}]  # the unclosed third block is no call
    env = Counter()
    env.reset(start=1)
    tools = tool_methods(env)
    assert call_tool(tools, calls[0], 5).content == "3"
    bad = call_tool(tools, ToolCall("add", {"m": 1}), 5)  # wrong argument: the error goes to the model
    assert (
        bad.error
        and bad.content.startswith("{'error': ")
        and "unexpected keyword argument 'm'" in bad.content
    )
    assert call_tool(tools, ToolCall("sub", {}), 5).content == "{'error': 'Tool sub not found.'}"
    unreadable = parse_tool_calls("<tool_call>not json</tool_call>")[0]
    assert call_tool(tools, unreadable, 5).error
    late = call_tool(tools, ToolCall("slow", {"seconds": 2.0}), 0.2)
    assert late.timeout and late.error and late.seconds < 1.0


def test_tool_suffix_and_demonstrations_match_the_chat_template() -> None:
    suffix = tool_suffix_ids(TOKENIZER, [ToolOutcome("add", "3")])
    assert TOKENIZER.decode(suffix) == "<|tool|>3<|assistant|>"
    messages = [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"n": 2}}}],
        },
        {"role": "tool", "name": "add", "content": "3"},
        {"role": "assistant", "content": "\\boxed{3}"},
    ]
    ids, mask = demonstration_tokens(TOKENIZER, messages)
    prompt = TOKENIZER.apply_chat_template(
        [{"role": "user", "content": "q"}], add_generation_prompt=True, tokenize=False
    )
    whole = TOKENIZER.apply_chat_template([{"role": "user", "content": "q"}, *messages], tokenize=False)
    assert TOKENIZER.encode(prompt, add_special_tokens=False) + ids == TOKENIZER.encode(
        whole, add_special_tokens=False
    )
    assert [TOKENIZER.decode([t]) for t, m in zip(ids, mask, strict=True) if not m] == [
        "<|tool|>",
        "3",
        "<|assistant|>",
    ]


def _turn(text: str, finish: str = "stop", version: int = 0) -> Turn:
    ids = [*TOKENIZER.encode(text, add_special_tokens=False), TOKENIZER.eos_token_id]
    return Turn(ids, [-0.5] * len(ids), finish, version)  # type: ignore[arg-type]


def test_episode_record_masks_tool_tokens_and_keeps_versions() -> None:
    prompt = Prompt("p", text="<|user|>q<|assistant|>", columns={"start": 1})
    runner = EpisodeRunner(Counter, EnvConfig(import_path="x:y", max_turns=3), TOKENIZER, max_model_len=512)
    try:
        [episode] = runner.start([prompt], 1, render=lambda p, obs: [])
        script = iter([_turn(format_tool_call("add", {"n": 2}), version=4), _turn("\\boxed{3}", version=5)])
        [rollout] = runner.run(
            [episode], lambda active, turn: [next(script) for _ in active], version=lambda: 4
        )
    finally:
        runner.close()
    assert rollout.episode is not None and (rollout.episode.turns, rollout.episode.tool_calls) == (2, 1)
    assert rollout.episode.environment.total == 3 and rollout.episode.messages[1]["content"] == "3"
    mask, versions = rollout.response_mask, rollout.response_versions
    assert mask is not None and versions is not None
    tool = [i for i, m in enumerate(mask) if not m]
    assert TOKENIZER.decode([rollout.response_ids[i] for i in tool]) == "<|tool|>3<|assistant|>"
    assert all(rollout.response_logprobs[i] == 0.0 for i in tool)
    assert versions[0] == 4 and versions[-1] == 5 and rollout.oldest_version == 4
    metrics = episode_metrics([rollout])
    assert metrics["env/turns_mean"] == 2 and metrics["env/tool_call_rate"] == 1.0
    assert metrics["env/tool_token_frac"] == pytest.approx(3 / len(rollout.response_ids))


def test_episode_limits_end_it() -> None:
    call = format_tool_call("add", {"n": 1})
    config = EnvConfig(import_path="x:y", max_turns=2)
    episode = Episode(Prompt("p", text="q"), [1, 2], Counter(), config, limit=512, tokenizer=TOKENIZER)
    episode.env.reset()
    assert episode.add_turn(_turn(call))
    assert episode.add_turn(_turn(call)) == [] and episode.done  # max_turns: the last turn's call is not run
    short = Episode(
        Prompt("p", text="q"),
        [1, 2],
        Counter(),
        config,
        limit=len(_turn(call).token_ids) + 4,
        tokenizer=TOKENIZER,
    )
    short.env.reset()
    calls = short.add_turn(_turn(call))
    short.add_tool_results(short.run_tools(calls), 0)  # "<|tool|>1<|assistant|>" would pass the limit
    assert short.done and short.finish_reason == "length" and len(short.info.messages) == 1
    cut = Episode(Prompt("p", text="q"), [1, 2], Counter(), config, limit=512, tokenizer=TOKENIZER)
    assert cut.add_turn(_turn(call[:-3], finish="length")) == [] and cut.finish_reason == "length"


def test_python_tool_runs_programs_in_the_run_sandbox() -> None:
    from rlstack.envs.backends import configure
    from rlstack.envs.config import SandboxConfig
    from rlstack.envs.python_tool import PythonTool

    configure(SandboxConfig(backend="process", strict=False))  # the test's opt-in; the demo uses bubblewrap
    try:
        tool = PythonTool(time_limit_s=2.0, max_output_chars=40)
        assert tool.python("print(4821*397)") == "1913937\n"
        assert tool.python("print(1/0)").startswith("exit 1: ZeroDivisionError")
        assert tool.python("while True: pass").startswith("timeout after")
        assert tool.python("print('x' * 100)").endswith("[... 101 characters in all]")
    finally:
        configure(SandboxConfig())
