"""`RolloutWorker`: one vLLM engine on the policy checkpoint, hosted by a Ray actor.

Token in, token out: prompts arrive as token ids (or text the worker tokenises once), responses leave as
token ids with the sampled tokens' log-probs and the weights version that produced them; nothing is
re-tokenised downstream. New weights go into the running engine in place (no restart), in buckets
(begin_update / load_bucket or receive_bucket / finish_update, driven by rollout.sync), or in one call
(`update_weights`); those methods come from rollout.sync.engine_rpc.EngineRPC. `engine: async` uses
rollout.async_worker.AsyncRolloutWorker instead.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.engine import EngineSettings, close_llm, make_llm
from rlstack.rollout.sync.engine_rpc import EngineRPC
from rlstack.types import FinishReason, Rollout


@dataclass
class Prompt:
    """One prompt to sample from. `token_ids` wins over `text` when both are given."""

    prompt_id: str
    text: str = ""
    token_ids: list[int] | None = None
    columns: dict[str, object] = field(default_factory=dict)


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
    )


class RolloutWorker(EngineRPC):
    """Plain class; `RolloutGroup` runs it as a Ray actor (`ray.remote(RolloutWorker)`). The weight-sync
    methods (`begin_update`, `load_bucket`, `join_group`, ...) are `EngineRPC`'s."""

    def __init__(self, model_path: str | Path, config: RolloutConfig, version: int = 0) -> None:
        self.config = config
        self.llm = make_llm(model_path, engine_settings(config))
        self.tokenizer = self.llm.get_tokenizer()
        self.version = version

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig | None = None) -> list[Rollout]:
        """`sampling.n` rollouts per prompt, grouped by prompt in input order."""
        sampling = sampling or self.config.sampling
        inputs = [token_prompt(self._prompt_ids(p)) for p in prompts]
        params = [sampling_params(sampling, i) for i in range(len(prompts))]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [r for p, out in zip(prompts, outputs, strict=True) for r in to_rollouts(p, out, self.version)]

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

    def info(self) -> dict[str, object]:
        return {"pid": os.getpid(), "version": self.version, "time": time.time()}

    def shutdown(self) -> None:
        """Close the engine inside the actor: a multiprocessing engine otherwise leaks /dev/shm."""
        if getattr(self, "llm", None) is not None:
            close_llm(self.llm)
            self.llm = None

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        return prompt_ids(prompt, self.tokenizer)


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
                finish_reason=_finish_reason(completion.finish_reason),
                version=version,
                prompt_text=prompt.text,
                response_text=completion.text,
                columns=dict(prompt.columns),
            )
        )
    return rollouts


def prompt_ids(prompt: Prompt, tokenizer: Any) -> list[int]:
    if prompt.token_ids is not None:
        return list(prompt.token_ids)
    if not prompt.text:
        raise ValueError(f"prompt {prompt.prompt_id!r} has neither text nor token_ids")
    return tokenizer.encode(prompt.text, add_special_tokens=False)


_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length"}


def _finish_reason(reason: str | None) -> FinishReason:
    return _FINISH_REASONS.get(reason or "", "abort")
