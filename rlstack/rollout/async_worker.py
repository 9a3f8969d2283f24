"""`AsyncRolloutWorker`: vLLM's AsyncLLM (vllm.v1.engine.async_llm) in a Ray async actor (`engine: async`).

Every `generate` call is a coroutine, so Ray runs calls concurrently: the requests of batch N+1 enter
the engine while batch N is still decoding (continuous batching across calls), and each call returns as
soon as its own requests finish. Requests are seeded exactly as in `RolloutWorker` (request i of a call
with `sampling.seed + i`), so both engines sample the same tokens for the same call (tested).

Weight updates keep every rollout on one weights version: `begin_update` stops new calls from starting,
waits for the running ones to finish on the old weights, then loads (the engine is idle while buckets
arrive); `finish_update` sets the new version and lets the waiting calls in.

With `rollout.partial_rollouts` an update does not wait: it aborts every request in flight (vLLM's
`pause_generation(mode="abort")`, which returns each request's tokens so far), loads, resumes, and each
unfinished completion continues as a new request whose prompt is the old prompt plus its tokens, prefilled
again under the new weights. Requests enter the engine only while no update is under way (the same lock),
so each segment's tokens and log-probs come from one known version (`response_versions`).

The engine side is the same `WorkerExtension` as the sync engine (layerwise reload + the CPU MoE re-prepack
of blocker 2), reached with AsyncLLM's own `collective_rpc` through the same forwarding methods
(rollout.sync.engine_rpc). AsyncLLM always runs its engine core in a separate process, so payloads cross
as bytes (tensors cannot), and `shutdown` must stop that process before Ray kills the actor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlstack.data.prompts import observation_prompt_ids, prompt_ids
from rlstack.envs.config import EnvConfig, SandboxConfig
from rlstack.envs.sandbox import SandboxError
from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.engine import close_llm, make_async_llm
from rlstack.rollout.sync.engine_rpc import AsyncEngineRPC
from rlstack.rollout.worker import (
    Prompt,
    attach_routes,
    checked_routes,
    engine_settings,
    episode_runner,
    fed_tokens,
    finish_reason,
    sampling_params,
    stamp_call,
    to_rollouts,
    to_turn,
    token_prompt,
    turn_params,
    worker_info,
)
from rlstack.types import Rollout

if TYPE_CHECKING:
    from rlstack.rollout.multiturn import Episode


@dataclass
class _Span:
    """A completion assembled from the segments of a partial rollout, each generated on one version."""

    started: int  # the version the first segment ran on (it may have produced no token)
    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str | None

    @classmethod
    def start(cls, completion: Any, version: int) -> _Span:
        span = cls(version, [], [], [], None)
        span.extend(completion, version)
        return span

    def extend(self, completion: Any, version: int) -> None:
        ids = list(completion.token_ids)
        self.token_ids += ids
        self.logprobs += [step[t].logprob for t, step in zip(ids, completion.logprobs or [], strict=True)]
        self.versions += [version] * len(ids)
        self.finish_reason = completion.finish_reason


class AsyncRolloutWorker(AsyncEngineRPC):
    """Plain class with async methods; `RolloutGroup` runs it as a Ray (async) actor. The weight-sync
    methods (`load_bucket`, `join_group`, ...) are `AsyncEngineRPC`'s; begin / finish gate generation."""

    def __init__(
        self,
        model_path: str | Path,
        config: RolloutConfig,
        version: int = 0,
        env: EnvConfig | None = None,
        sandbox: SandboxConfig | None = None,
        record_routing: bool = False,
    ) -> None:
        """`record_routing`: as in `RolloutWorker`."""
        self.config = config
        self.llm: Any = make_async_llm(model_path, engine_settings(config))
        self.tokenizer = self.llm.get_tokenizer()
        self.version = version
        self.episodes = episode_runner(env, sandbox, self.tokenizer, config.max_model_len)
        self._calls = itertools.count()
        self._running = 0
        self._updating = False
        self._state = asyncio.Condition()
        self._record_routing = record_routing
        self.record_routing: bool | None = None  # known after the first call (collective_rpc is async)

    async def generate(
        self, prompts: list[Prompt], sampling: SamplingConfig | None = None, tools: bool = True
    ) -> list[Rollout]:
        """`sampling.n` rollouts per prompt, grouped by prompt in input order: multi-turn episodes when the
        run has an `env:` (and `tools`), each its own coroutine, else one response each."""
        from vllm.sampling_params import RequestOutputKind

        sampling = sampling or self.config.sampling
        async with self._state:
            await self._state.wait_for(lambda: not self._updating)
            self._running += 1
            version = self.version
        started = time.time()
        try:
            if self.record_routing is None:
                layers = (
                    await self.llm.collective_rpc("rlstack_record_routing") if self._record_routing else [0]
                )
                self.record_routing = layers[0] > 0
            call = next(self._calls)
            if self.episodes is not None and tools:
                schemas = self.episodes.tools
                render = lambda p, obs: observation_prompt_ids(p, obs, self.tokenizer, schemas)  # noqa: E731
                episodes = self.episodes.start(prompts, sampling.n, render)
                runs = [self._episode(e, i, sampling, call) for i, e in enumerate(episodes)]
                await asyncio.gather(*runs)
                return stamp_call([e.to_rollout() for e in episodes], started)
            if self.config.partial_rollouts:
                spanning = [
                    self._spanning(prompt_ids(p, self.tokenizer), sampling, i, call)
                    for i, p in enumerate(prompts)
                ]
                spans = await asyncio.gather(*spanning)
                rollouts = [r for p, o in zip(prompts, spans, strict=True) for r in self._span_rollouts(p, o)]
                return stamp_call(rollouts, started)
            inputs = [token_prompt(prompt_ids(p, self.tokenizer)) for p in prompts]
            requests = []
            for i, prompt in enumerate(inputs):
                params = sampling_params(sampling, i)
                params.output_kind = RequestOutputKind.FINAL_ONLY
                requests.append(self._final_output(prompt, params, f"rlstack-{os.getpid()}-{call}-{i}"))
            outputs = await asyncio.gather(*requests)
            rollouts = [
                r for p, out in zip(prompts, outputs, strict=True) for r in to_rollouts(p, out, version)
            ]
            if self.record_routing:
                attach_routes(rollouts, await self._take_routes([fed_tokens(r) for r in rollouts]))
        finally:
            async with self._state:
                self._running -= 1
                self._state.notify_all()
        return stamp_call(rollouts, started)

    async def _request(self, ids: list[int], params: Any, request_id: str) -> tuple[Any, int]:
        """Partial rollouts: one request, added only while no weight update is under way; its final output
        (aborted with its tokens so far when an update interrupts it) and the weights version it ran on."""
        async with self._state:
            await self._state.wait_for(lambda: not self._updating)
            queue = await self.llm.add_request(
                f"rlstack-{os.getpid()}-{request_id}", token_prompt(ids), params
            )
            version = self.version
        try:
            while True:
                out = queue.get_nowait() or await queue.get()
                if out.finished:
                    return out, version
        except asyncio.CancelledError:
            await self.llm.abort(queue.request_id, internal=True)
            raise

    async def _spanning(self, ids: list[int], sampling: SamplingConfig, index: int, call: int) -> list[_Span]:
        """Partial rollouts: the `sampling.n` completions of request `index` of a call, each continued across
        weight updates until it finishes (see the module docstring)."""
        from vllm.sampling_params import RequestOutputKind

        params = sampling_params(sampling, index)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        request_id = f"{call}-{index}"
        out, version = await self._request(ids, params, request_id)
        spans = [_Span.start(c, version) for c in out.outputs]
        for j, span in enumerate(spans):
            while span.finish_reason == "abort" and len(span.token_ids) < params.max_tokens:
                more = params.clone()
                more.n = 1
                more.max_tokens = params.max_tokens - len(span.token_ids)
                more.min_tokens = max(0, params.min_tokens - len(span.token_ids))
                more.seed = (
                    None if params.seed is None else params.seed + 1_000_003 * (j + 1) + len(span.token_ids)
                )
                out, version = await self._request(
                    ids + span.token_ids, more, f"{request_id}-{j}-{len(span.token_ids)}"
                )
                span.extend(out.outputs[0], version)
        return spans

    def _span_rollouts(self, prompt: Prompt, spans: list[_Span]) -> list[Rollout]:
        ids = prompt_ids(prompt, self.tokenizer)
        return [
            Rollout(
                prompt_id=prompt.prompt_id,
                prompt_ids=list(ids),
                response_ids=span.token_ids,
                response_logprobs=span.logprobs,
                finish_reason=finish_reason(
                    span.finish_reason if span.finish_reason != "abort" else "length"
                ),
                version=span.started,
                prompt_text=prompt.text,
                response_text=self.tokenizer.decode(span.token_ids, skip_special_tokens=True),
                columns=dict(prompt.columns),
                response_versions=span.versions,
            )
            for span in spans
        ]

    async def _take_routes(self, sequences: list[list[int]]) -> list[Any]:
        from rlstack.rollout.routing_capture import decode_record

        wires = (await self.llm.collective_rpc("rlstack_take_routes", args=(sequences,)))[0]
        return [decode_record(w) for w in wires]

    async def _episode(self, episode: Episode, index: int, sampling: SamplingConfig, call: int) -> None:
        """One episode to its end: generate a turn, run its tools in the env pool, repeat. Other episodes'
        turns keep generating while this one's tools run."""
        from vllm.sampling_params import RequestOutputKind

        assert self.episodes is not None
        loop = asyncio.get_running_loop()
        turn = 0
        while episode.may_continue():
            params = turn_params(sampling, episode, index, turn)
            params.output_kind = RequestOutputKind.FINAL_ONLY
            request_id = f"rlstack-{os.getpid()}-{call}-{index}-{turn}"
            out = await self._final_output(token_prompt(episode.ids), params, request_id)
            next_turn = to_turn(out, self.version)
            if self.record_routing:
                fed = [episode.ids + next_turn.token_ids[:-1]]
                records = checked_routes(fed, await self._take_routes(fed))
                next_turn = dataclasses.replace(next_turn, routes=records[0])
            calls = episode.add_turn(next_turn)
            if calls:
                try:
                    outcomes = await loop.run_in_executor(self.episodes.pool, episode.run_tools, calls)
                except SandboxError as e:
                    episode.fail(e)
                    break
                episode.add_tool_results(outcomes, self.version)
            turn += 1

    async def _final_output(self, prompt: Any, params: Any, request_id: str) -> Any:
        final = None
        async for output in self.llm.generate(prompt, params, request_id):
            final = output
        if final is None or not final.finished:
            raise RuntimeError(f"vLLM request {request_id} ended without a final output")
        return final

    # Bucketed weight updates (rollout.sync): begin, buckets, finish. See the module docstring.
    async def begin_update(self) -> None:
        async with self._state:
            self._updating = True
            if not self.config.partial_rollouts:
                await self._state.wait_for(lambda: self._running == 0)
        if self.config.partial_rollouts:
            # every request in flight ends now with its tokens so far; none enters until finish_update
            await self.llm.pause_generation(mode="abort", clear_cache=True)
        await super().begin_update()

    async def finish_update(self, version: int | None) -> int:
        try:
            return await self._finish_reload()
        finally:
            if self.config.partial_rollouts:
                await self.llm.resume_generation()
            async with self._state:
                if version is not None:
                    self.version = version
                self._updating = False
                self._state.notify_all()

    async def set_version(self, version: int) -> None:
        async with self._state:
            self.version = version

    async def get_version(self) -> int:
        return self.version

    async def info(self) -> dict[str, Any]:
        return worker_info(self.version, getattr(self.llm, "_rlstack_scratch", None))

    async def shutdown(self) -> None:
        """Stop the engine core process (and free its /dev/shm) before Ray kills the actor."""
        if self.episodes is not None:
            self.episodes.close()
            self.episodes = None
        if getattr(self, "llm", None) is not None:
            close_llm(self.llm)
            self.llm = None
