"""Multi-turn episodes with tools, token in and token out.

An `Episode` is one trajectory: the prompt's ids, then turns of model tokens (loss mask 1, each with its
rollout log-prob and weights version) and tool-result tokens (mask 0, log-prob 0). Turn k+1's prompt is
exactly turn k's prompt + its response + the tool-result tokens (rlstack.envs.tool_calls.tool_suffix_ids):
nothing is re-tokenised or re-rendered. An episode ends when a turn calls no tool, stops at the length
limit, reaches `max_turns` (that turn's calls are not run), or when the next tool output would pass
`max_total_tokens` (that output is not added).

`EpisodeRunner` runs many episodes at once: the sync engine generates one batched turn for every episode
still going, while each episode's tool calls run in a thread pool (`env.pool_size`), so a slow tool holds
only its own episode; the async engine runs each episode as its own coroutine (rollout.async_worker).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rlstack.data.prompts import prompt_ids
from rlstack.envs.config import EnvConfig
from rlstack.envs.environment import env_name, reset_environment, tool_methods, tool_schemas
from rlstack.envs.registry import close_environment
from rlstack.envs.sandbox import SandboxError
from rlstack.envs.tool_calls import ToolCall, ToolOutcome, call_tool, parse_tool_calls, tool_suffix_ids
from rlstack.types import EpisodeInfo, FinishReason, Prompt, Rollout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Turn:
    """One generated assistant turn, as the engine returned it."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    version: int
    routes: Any = None
    """The engine's routing record of this turn's request (rollout.routing_capture), when recorded."""


class Episode:
    """One multi-turn trajectory and its environment instance (see the module docstring)."""

    def __init__(
        self, prompt: Prompt, prompt_ids: list[int], env: Any, config: EnvConfig, limit: int, tokenizer: Any
    ) -> None:
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.env = env
        self.tools = tool_methods(env)
        self.config = config
        self.limit = limit
        """Most tokens of prompt + response (env.max_total_tokens, at most the engine's max_model_len)."""
        self.tokenizer = tokenizer
        self.response_ids: list[int] = []
        self.logprobs: list[float] = []
        self.mask: list[int] = []
        self.versions: list[int] = []
        self.info = EpisodeInfo()
        self.finish_reason: FinishReason = "stop"
        self.done = False
        self.first_version: int | None = None
        # routing records: each turn adds the rows of positions first fed in its request (the new ones)
        self.routes: list[Any] | None = []
        self.routed = 0

    @property
    def ids(self) -> list[int]:
        """The next turn's prompt: the prompt, every turn and every tool output so far."""
        return self.prompt_ids + self.response_ids

    def room(self, max_tokens: int) -> int:
        """Tokens the next turn may generate."""
        return min(max_tokens, self.limit - len(self.prompt_ids) - len(self.response_ids))

    def may_continue(self) -> bool:
        """Whether another turn can be generated; an episode with no room left ends at the length limit."""
        if not self.done and self.room(1) <= 0:
            self.done, self.finish_reason = True, "length"
        return not self.done

    def add_turn(self, turn: Turn) -> list[ToolCall]:
        """Append a generated turn; returns the tool calls to run next ([] when the episode has ended)."""
        if self.first_version is None:
            self.first_version = turn.version
        if turn.routes is None:
            self.routes = None
        elif self.routes is not None:
            self.routes.append(turn.routes[self.routed :])
            self.routed = len(turn.routes)
        self.response_ids += turn.token_ids
        self.logprobs += turn.logprobs
        self.mask += [1] * len(turn.token_ids)
        self.versions += [turn.version] * len(turn.token_ids)
        self.info.turns += 1
        text = self.tokenizer.decode(turn.token_ids, skip_special_tokens=True)
        calls = parse_tool_calls(text) if turn.finish_reason == "stop" else []
        message: dict[str, Any] = {"role": "assistant", "content": _without_calls(text)}
        if calls:
            message["tool_calls"] = [c.message() for c in calls]
        self.info.messages.append(message)
        self.finish_reason = turn.finish_reason
        if not calls or self.info.turns >= self.config.max_turns:
            self.done = True
            return []
        return calls

    def run_tools(self, calls: Sequence[ToolCall]) -> list[ToolOutcome]:
        """Run one turn's calls in order (called in a pool thread)."""
        return [call_tool(self.tools, call, self.config.tool_timeout_s) for call in calls]

    def add_tool_results(self, outcomes: list[ToolOutcome], version: int) -> None:
        """Append the tool-result tokens, unless they would pass the token limit (then the episode ends)."""
        self.info.tool_calls += len(outcomes)
        self.info.tool_errors += sum(o.error for o in outcomes)
        self.info.tool_timeouts += sum(o.timeout for o in outcomes)
        self.info.tool_seconds += sum(o.seconds for o in outcomes)
        suffix = tool_suffix_ids(self.tokenizer, outcomes)
        if len(self.prompt_ids) + len(self.response_ids) + len(suffix) >= self.limit:
            self.done, self.finish_reason = True, "length"
            return
        self.response_ids += suffix
        self.logprobs += [0.0] * len(suffix)
        self.mask += [0] * len(suffix)
        self.versions += [version] * len(suffix)
        self.info.messages += [o.message() for o in outcomes]

    def fail(self, error: BaseException) -> None:
        """The episode cannot go on fairly (its sandbox failed): it ends, and is never scored."""
        self.done = True
        self.finish_reason = "abort"
        self.info.error = f"{type(error).__name__}: {error}"
        logger.warning("episode %s stopped: %s", self.prompt.prompt_id, self.info.error)

    def to_rollout(self) -> Rollout:
        self.info.environment = _picklable(self.env)
        close_environment(self.env)
        return Rollout(
            prompt_id=self.prompt.prompt_id,
            prompt_ids=self.prompt_ids,
            response_ids=self.response_ids,
            response_logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            version=self.first_version if self.first_version is not None else 0,
            prompt_text=self.prompt.text,
            response_text=self.tokenizer.decode(self.response_ids, skip_special_tokens=False),
            response_mask=self.mask,
            response_versions=self.versions,
            columns=dict(self.prompt.columns),
            episode=self.info,
            routed_experts=self._routed_experts(),
        )

    def _routed_experts(self) -> Any:
        if not self.routes:
            return None
        import numpy as np

        from rlstack.rollout.routing_capture import full_sequence_routes

        return full_sequence_routes(
            np.concatenate(self.routes), len(self.prompt_ids) + len(self.response_ids)
        )


TurnGenerator = Callable[[list[Episode], int], list[Turn]]
"""Generates the next turn of each given episode (argument 2: the turn index, for seeding)."""


class EpisodeRunner:
    """Starts episodes for prompts and runs them to the end with a batched turn generator (sync engine),
    tool calls in a thread pool. The async engine drives `Episode`s itself (rollout.async_worker)."""

    def __init__(
        self, factory: Callable[[], Any], config: EnvConfig, tokenizer: Any, max_model_len: int
    ) -> None:
        self.factory = factory
        self.config = config
        self.tokenizer = tokenizer
        self.limit = min(config.max_total_tokens or max_model_len, max_model_len)
        self.pool = ThreadPoolExecutor(config.pool_size, thread_name_prefix="rlstack-env")
        probe = factory()
        self.tools: list[dict[str, Any]] = tool_schemas(probe)
        """The tools' JSON schemas (for re-rendering a prompt with a `reset()` observation)."""
        close_environment(probe)

    def start(
        self, prompts: Sequence[Prompt], n: int, render: Callable[[Prompt, str], list[int]]
    ) -> list[Episode]:
        """`n` episodes per prompt, grouped by prompt, each with a fresh, reset environment instance.
        `render(prompt, observation)` gives the prompt ids with a `reset` observation appended to the
        last user message."""
        episodes = []
        for prompt in prompts:
            for _ in range(n):
                env = self.factory()
                observation = reset_environment(env, dict(prompt.columns))
                ids = (
                    prompt_ids(prompt, self.tokenizer) if observation is None else render(prompt, observation)
                )
                episodes.append(Episode(prompt, ids, env, self.config, self.limit, self.tokenizer))
        return episodes

    def run(
        self, episodes: list[Episode], generate: TurnGenerator, version: Callable[[], int]
    ) -> list[Rollout]:
        """Turn by turn: one batched generation for every episode still going, then their tool calls at
        once in the pool."""
        turn = 0
        while active := [e for e in episodes if e.may_continue()]:
            turns = generate(active, turn)
            pending: list[tuple[Episode, Future[list[ToolOutcome]]]] = []
            for episode, generated in zip(active, turns, strict=True):
                calls = episode.add_turn(generated)
                if calls:
                    pending.append((episode, self.pool.submit(episode.run_tools, calls)))
            for episode, future in pending:
                try:
                    episode.add_tool_results(future.result(), version())
                except SandboxError as e:
                    episode.fail(e)
            turn += 1
        return [e.to_rollout() for e in episodes]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _without_calls(text: str) -> str:
    start = text.find("<tool_call>")
    return text if start < 0 else text[:start]


def _picklable(env: Any) -> Any:
    """The environment, if it can travel to the reward workers (pickle); else None, logged once per class."""
    try:
        pickle.dumps(env)
    except Exception as e:
        name = env_name(env)
        if name not in _unpicklable:
            _unpicklable.add(name)
            logger.warning("environment %s cannot be pickled (%s): rewards get environments=None", name, e)
        return None
    return env


_unpicklable: set[str] = set()


def episode_metrics(rollouts: Sequence[Rollout], prefix: str = "env/") -> dict[str, float]:
    """Per-step tool-use metrics over the episodes among `rollouts` ({} when there are none): turns and
    tool calls per trajectory, share with a tool call, tool errors and time-outs, tool seconds, failed
    episodes, and the share of response tokens that are tool output."""
    episodes = [(r, r.episode) for r in rollouts if r.episode is not None]
    if not episodes:
        return {}
    n = len(episodes)
    tokens = sum(len(r.response_ids) for r, _ in episodes)
    tool_tokens = sum(len(r.response_ids) - sum(r.response_mask or []) for r, _ in episodes)
    return {
        f"{prefix}turns_mean": sum(e.turns for _, e in episodes) / n,
        f"{prefix}tool_calls_mean": sum(e.tool_calls for _, e in episodes) / n,
        f"{prefix}tool_call_rate": sum(e.tool_calls > 0 for _, e in episodes) / n,
        f"{prefix}tool_errors": float(sum(e.tool_errors for _, e in episodes)),
        f"{prefix}tool_timeouts": float(sum(e.tool_timeouts for _, e in episodes)),
        f"{prefix}tool_seconds": sum(e.tool_seconds for _, e in episodes),
        f"{prefix}failed_episodes": float(sum(e.error is not None for _, e in episodes)),
        f"{prefix}tool_token_frac": tool_tokens / max(tokens, 1),
    }
