"""`RolloutWorker`: one vLLM engine on the policy checkpoint, hosted by a Ray actor.

Token in, token out: prompts arrive as token ids (or text the worker tokenises once), responses leave as
token ids with the sampled tokens' log-probs and the weights version that produced them; nothing is
re-tokenised downstream. `update_weights` swaps weights into the running engine (no restart).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.engine import EngineSettings, close_llm, make_llm
from rlstack.rollout.weight_sync import push_weights
from rlstack.types import Rollout


@dataclass
class Prompt:
    """One prompt to sample from. `token_ids` wins over `text` when both are given."""

    prompt_id: str
    text: str = ""
    token_ids: list[int] | None = None
    columns: dict[str, object] = field(default_factory=dict)


class RolloutWorker:
    """Plain class; `RolloutGroup` runs it as a Ray actor (`ray.remote(RolloutWorker)`)."""

    def __init__(self, model_path: str | Path, config: RolloutConfig, version: int = 0) -> None:
        settings = EngineSettings(
            max_model_len=config.max_model_len,
            kv_cache_mb=config.kv_cache_mb,
            max_num_seqs=config.max_num_seqs,
            seed=config.sampling.seed,
            multiprocessing=config.multiprocessing,
            enforce_eager=config.enforce_eager,
            threads_bind=config.threads_bind,
        )
        self.config = config
        self.llm = make_llm(model_path, settings)
        self.tokenizer = self.llm.get_tokenizer()
        self.version = version

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig | None = None) -> list[Rollout]:
        """`sampling.n` rollouts per prompt, grouped by prompt in input order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sampling = sampling or self.config.sampling
        inputs = [TokensPrompt(prompt_token_ids=self._prompt_ids(p)) for p in prompts]
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                logprobs=0,  # exactly the sampled token's log-prob
                seed=sampling.seed + i,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        rollouts = []
        for prompt, out in zip(prompts, outputs, strict=True):
            for completion in out.outputs:
                ids = list(completion.token_ids)
                logprobs = [
                    step[token].logprob for token, step in zip(ids, completion.logprobs or [], strict=True)
                ]
                rollouts.append(
                    Rollout(
                        prompt_id=prompt.prompt_id,
                        prompt_ids=list(out.prompt_token_ids),
                        response_ids=ids,
                        response_logprobs=logprobs,
                        finish_reason=_finish_reason(completion.finish_reason),
                        version=self.version,
                        prompt_text=prompt.text,
                        response_text=completion.text,
                        columns=dict(prompt.columns),
                    )
                )
        return rollouts

    def update_weights(self, payload: bytes, version: int) -> dict[str, float]:
        """Load serialised weights in place (see rollout.weight_sync) and take on `version`."""
        stats = push_weights(self.llm, payload)
        self.version = version
        return {
            "sync/bytes": float(stats.bytes),
            "sync/seconds": stats.seconds,
            "sync/mb_per_s": stats.mb_per_s,
        }

    def get_version(self) -> int:
        return self.version

    def parameters_bytes(self) -> bytes:
        """The engine's live parameters (safetensors bytes), for checks against a fresh engine."""
        return self.llm.collective_rpc("rlstack_parameters")[0]

    def info(self) -> dict[str, object]:
        return {"pid": os.getpid(), "version": self.version, "time": time.time()}

    def shutdown(self) -> None:
        """Close the engine inside the actor: a multiprocessing engine otherwise leaks /dev/shm."""
        if getattr(self, "llm", None) is not None:
            close_llm(self.llm)
            self.llm = None

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        if not prompt.text:
            raise ValueError(f"prompt {prompt.prompt_id!r} has neither text nor token_ids")
        return self.tokenizer.encode(prompt.text, add_special_tokens=False)


def _finish_reason(reason: str | None) -> str:
    return {"stop": "stop", "length": "length"}.get(reason or "", "abort")
