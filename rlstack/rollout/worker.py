"""`RolloutWorker`: one vLLM engine on the policy checkpoint, hosted by a Ray actor.

Token in, token out: prompts arrive as token ids (or text the worker tokenises once), responses leave as
token ids with the sampled tokens' log-probs and the weights version that produced them; nothing is
re-tokenised downstream. New weights go into the running engine in place (no restart), in buckets
(begin_update / load_bucket or receive_bucket / finish_update, driven by rollout.sync), or in one call
(`update_weights`); those methods come from rollout.sync.engine_rpc.EngineRPC. `engine: async` uses
rollout.async_worker.AsyncRolloutWorker instead.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlstack.data.prompts import observation_prompt_ids, prompt_ids
from rlstack.envs.config import EnvConfig, SandboxConfig
from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.engine import EngineSettings, close_llm, make_llm
from rlstack.rollout.sync.engine_rpc import EngineRPC
from rlstack.types import FinishReason, Prompt, Rollout

if TYPE_CHECKING:
    from rlstack.rollout.multiturn import Episode, EpisodeRunner, Turn


def engine_settings(config: RolloutConfig) -> EngineSettings:
    return EngineSettings(
        max_model_len=config.max_model_len,
        kv_cache_mb=config.kv_cache_mb,
        max_num_seqs=config.max_num_seqs,
        dtype=config.dtype,
        seed=config.sampling.seed,
        multiprocessing=config.multiprocessing,
        enforce_eager=config.enforce_eager,
        threads_bind=config.threads_bind,
        num_threads=config.num_threads,
        logits_processors=tuple(config.logits_processors),
    )


class RolloutWorker(EngineRPC):
    """Plain class; `RolloutGroup` runs it as a Ray actor (`ray.remote(RolloutWorker)`). The weight-sync
    methods (`begin_update`, `load_bucket`, `join_group`, ...) are `EngineRPC`'s."""

    def __init__(
        self,
        model_path: str | Path,
        config: RolloutConfig,
        version: int = 0,
        env: EnvConfig | None = None,
        sandbox: SandboxConfig | None = None,
        record_routing: bool = False,
    ) -> None:
        """`record_routing`: attach the engine's routed experts to every rollout (MoE policies; routing
        replay and the learner's routing probes need them; rollout.routing_capture)."""
        self.config = config
        self.llm = make_llm(model_path, engine_settings(config))
        self.tokenizer = self.llm.get_tokenizer()
        self.version = version
        self.episodes = episode_runner(env, sandbox, self.tokenizer, config.max_model_len)
        self.record_routing = record_routing and self.llm.collective_rpc("rlstack_record_routing")[0] > 0

    def generate(
        self, prompts: list[Prompt], sampling: SamplingConfig | None = None, tools: bool = True
    ) -> list[Rollout]:
        """`sampling.n` rollouts per prompt, grouped by prompt in input order: multi-turn episodes when the
        run has an `env:` (and `tools`), else one response each."""
        started = time.time()
        return stamp_call(self._generate(prompts, sampling or self.config.sampling, tools), started)

    def _generate(self, prompts: list[Prompt], sampling: SamplingConfig, tools: bool) -> list[Rollout]:
        if self.episodes is not None and tools:
            episodes = self.episodes.start(prompts, sampling.n, self._render)
            return self.episodes.run(
                episodes, lambda active, turn: self._turns(active, turn, sampling), self.get_version
            )
        inputs = [token_prompt(self._prompt_ids(p)) for p in prompts]
        params = [sampling_params(sampling, i) for i in range(len(prompts))]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        rollouts = [
            r for p, out in zip(prompts, outputs, strict=True) for r in to_rollouts(p, out, self.version)
        ]
        if self.record_routing:
            attach_routes(rollouts, self._take_routes([fed_tokens(r) for r in rollouts]))
        return rollouts

    def _take_routes(self, sequences: list[list[int]]) -> list[Any]:
        from rlstack.rollout.routing_capture import decode_record

        return [
            decode_record(w) for w in self.llm.collective_rpc("rlstack_take_routes", args=(sequences,))[0]
        ]

    def finish_update(self, version: int | None) -> int:
        """End the update (MoE layers re-prepacked: returned); `version=None` keeps the old version."""
        repacked = self._finish_reload()
        if version is not None:
            self.version = version
        return repacked

    def set_version(self, version: int) -> None:
        self.version = version

    def get_version(self) -> int:
        return self.version

    def info(self) -> dict[str, Any]:
        return worker_info(self.version, getattr(self.llm, "_rlstack_scratch", None))

    def shutdown(self) -> None:
        """Close the engine inside the actor: a multiprocessing engine otherwise leaks /dev/shm."""
        episodes = getattr(self, "episodes", None)
        if episodes is not None:
            episodes.close()
            self.episodes = None
        if getattr(self, "llm", None) is not None:
            close_llm(self.llm)
            self.llm = None

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        return prompt_ids(prompt, self.tokenizer)

    def _render(self, prompt: Prompt, observation: str) -> list[int]:
        assert self.episodes is not None
        return observation_prompt_ids(prompt, observation, self.tokenizer, self.episodes.tools)

    def _turns(self, episodes: list[Episode], turn: int, sampling: SamplingConfig) -> list[Turn]:
        """One batched engine call: the next turn of every given episode."""
        inputs = [token_prompt(e.ids) for e in episodes]
        params = [turn_params(sampling, e, i, turn) for i, e in enumerate(episodes)]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        turns = [to_turn(out, self.version) for out in outputs]
        if self.record_routing:
            fed = [e.ids + t.token_ids[:-1] for e, t in zip(episodes, turns, strict=True)]
            records = checked_routes(fed, self._take_routes(fed))
            turns = [dataclasses.replace(t, routes=r) for t, r in zip(turns, records, strict=True)]
        return turns


def worker_info(version: int, scratch: str | None) -> dict[str, Any]:
    """Who a rollout worker is: pid, Ray node, host, the engine processes it started (killed with it), its
    engine's scratch dir (removed with it: a killed worker never runs close_llm) and its weights version;
    `time` is when this was asked (later than any of those processes started)."""
    import socket

    import psutil
    import ray

    return {
        "pid": os.getpid(),
        "node": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "children": [p.pid for p in psutil.Process().children(recursive=True)],
        "scratch": scratch,
        "version": version,
        "time": time.time(),
    }


def episode_runner(
    env: EnvConfig | None, sandbox: SandboxConfig | None, tokenizer: Any, max_model_len: int
) -> EpisodeRunner | None:
    """The worker's multi-turn runner when the run has an `env:` section: its environment checked and the
    run's sandbox configured for this process (what the environment's tools run in)."""
    if env is None:
        return None
    from rlstack.envs.backends import configure, run_sandbox
    from rlstack.envs.registry import env_factory, env_uses_sandbox
    from rlstack.rollout.multiturn import EpisodeRunner

    configure(sandbox or SandboxConfig())
    if env_uses_sandbox(env):
        run_sandbox()  # built now: a host without the configured backend fails the run at start-up
    return EpisodeRunner(env_factory(env), env, tokenizer, max_model_len)


def turn_params(sampling: SamplingConfig, episode: Episode, index: int, turn: int) -> Any:
    """Sampling parameters of one episode's next turn: one response, at most the room it has left, seeded
    by the episode's index in the call and the turn."""
    one = sampling.model_copy(
        update={
            "n": 1,
            "max_tokens": episode.room(sampling.max_tokens),
            "seed": sampling.seed + 1_000_003 * turn,
        }
    )
    return sampling_params(one, index)


def to_turn(out: Any, version: int) -> Turn:
    """A vLLM `RequestOutput` of one request (n = 1) -> the episode's next `Turn`."""
    from rlstack.rollout.multiturn import Turn

    completion = out.outputs[0]
    ids = list(completion.token_ids)
    logprobs = [step[token].logprob for token, step in zip(ids, completion.logprobs or [], strict=True)]
    return Turn(ids, logprobs, finish_reason(completion.finish_reason), version)


def stamp_call(rollouts: list[Rollout], started: float) -> list[Rollout]:
    """Record on each rollout the wall-clock span of the call that generated it (`generated_between`)."""
    span = (started, time.time())
    for rollout in rollouts:
        rollout.generated_between = span
    return rollouts


def token_prompt(ids: list[int]) -> Any:
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=ids)


def sampling_params(sampling: SamplingConfig, index: int) -> Any:
    """vLLM sampling parameters of request `index` of a call: seeded with `sampling.seed + index`."""
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_tokens,
        min_tokens=sampling.min_tokens,
        logprobs=0,  # exactly the sampled token's log-prob (of the sampling distribution: engine.py)
        seed=sampling.seed + index,
    )


def to_rollouts(prompt: Prompt, out: Any, version: int) -> list[Rollout]:
    """A vLLM `RequestOutput` → one `Rollout` per completion."""
    rollouts = []
    for completion in out.outputs:
        ids = list(completion.token_ids)
        logprobs = [step[token].logprob for token, step in zip(ids, completion.logprobs or [], strict=True)]
        rollouts.append(
            Rollout(
                prompt_id=prompt.prompt_id,
                prompt_ids=list(out.prompt_token_ids),
                response_ids=ids,
                response_logprobs=logprobs,
                finish_reason=finish_reason(completion.finish_reason),
                version=version,
                prompt_text=prompt.text,
                response_text=completion.text,
                columns=dict(prompt.columns),
            )
        )
    return rollouts


def fed_tokens(rollout: Rollout) -> list[int]:
    """The tokens the engine fed through the model for a rollout: all but the last sampled one."""
    return rollout.prompt_ids + rollout.response_ids[:-1]


def checked_routes(sequences: list[list[int]], records: list[Any]) -> list[Any]:
    """The engine's routing records, one per fed sequence; a missing one is an error, never a silent gap."""
    for seq, record in zip(sequences, records, strict=True):
        if record is None:
            raise RuntimeError(
                f"the rollout engine recorded no routing for a {len(seq)}-token request "
                "(rollout.routing_capture found no request that fed exactly these tokens)"
            )
    return records


def attach_routes(rollouts: list[Rollout], records: list[Any]) -> None:
    """Set each rollout's `routed_experts` (whole sequence, no-route rows where nothing was fed)."""
    from rlstack.rollout.routing_capture import full_sequence_routes

    records = checked_routes([fed_tokens(r) for r in rollouts], records)
    for rollout, record in zip(rollouts, records, strict=True):
        rollout.routed_experts = full_sequence_routes(
            record, len(rollout.prompt_ids) + len(rollout.response_ids)
        )


_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length"}


def finish_reason(reason: str | None) -> FinishReason:
    """vLLM's finish reason as a rollout's (`stop`, `length`, ...; anything unknown is `abort`)."""
    return _FINISH_REASONS.get(reason or "", "abort")
