"""Config of the rollout side: how many vLLM workers, how they sample, how much memory they take."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlstack.config_base import StrictModel


class SamplingConfig(StrictModel):
    n: int = Field(8, ge=1)
    """Responses sampled per prompt (the group size of group advantages)."""
    max_tokens: int = Field(64, ge=1)
    """Length limit of a response; responses that hit it finish with reason `length`."""
    min_tokens: int = Field(0, ge=0)
    """EOS and stop tokens are suppressed until a response has this many tokens (benchmarks use it to fix
    response lengths; keep 0 for RL: the recorded log-probs then include the suppression, which the learner
    does not reproduce)."""
    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature, exact for RL: the engine records the log-probs of the tempered distribution and
    the learner scores under the same one (rlstack.learner.logprobs.SamplingTransform). 0 = greedy, for
    evaluation only (not a distribution: the learner refuses it); values in (0, 0.01) are refused because
    vLLM would silently raise them to 0.01."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling (after temperature and top_k): the smallest set of most likely tokens whose mass
    reaches top_p, renormalised; 1 = off. Exact like temperature: the learner recomputes the support from its
    own logits, and a token where the learner's and the engine's supports differ shows up in x_t."""
    top_k: int = Field(0, ge=0)
    """Keep only the top_k most likely tokens (after temperature, before top_p); 0 = off. Exact like top_p."""
    seed: int = 0
    """Base seed; request i of a call is sampled with seed + i, so a batch is reproducible."""

    @model_validator(mode="after")
    def _check(self) -> SamplingConfig:
        if 0.0 < self.temperature < 0.01:
            raise ValueError(
                f"rollout.sampling.temperature = {self.temperature}: vLLM raises temperatures below 0.01 to "
                "0.01, which the learner would not know; use 0 (greedy) or a value >= 0.01"
            )
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"rollout.sampling.min_tokens = {self.min_tokens} exceeds max_tokens = {self.max_tokens}"
            )
        return self


class RolloutConfig(StrictModel):
    num_workers: int = Field(1, ge=1)
    """vLLM engines (Ray actors). Prompts are spread over them."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """Ray CPUs reserved by each rollout actor."""
    ray_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each rollout actor needs, e.g. `{rollout_node: 1}`: places the engines on the
    nodes started with them (`ray start --resources='{"rollout_node": 4}'`). Empty: anywhere."""
    gpus_per_worker: float | None = Field(None, ge=0)
    """Ray GPUs reserved by each rollout actor (vLLM then runs on the GPU Ray assigns it); None = 1 when the
    Ray cluster has GPUs, 0 on a CPU-only cluster (vLLM-CPU)."""
    sampling: SamplingConfig = SamplingConfig()
    """How responses are sampled."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of the vLLM engines. Keep float32 on CPU: a bf16 engine's log-probs differ from fp32
    by up to 3.5 nats on the tiny model, which swamps the MIS-PO ratios (every token gets filtered)."""
    max_model_len: int = Field(512, ge=16)
    """Longest prompt + response the engine accepts."""
    kv_cache_mb: int = Field(64, ge=1)
    """Explicit KV-cache size per engine, in MiB (never a fraction of the machine's memory)."""
    max_num_seqs: int = Field(256, ge=1)
    """Sequences the engine batches at once."""
    logits_processors: list[str] = Field(default_factory=list)
    """vLLM V1 logits processors loaded into every engine, as 'module:Class' (vLLM's `LogitsProcessor`
    interface), e.g. for constrained decoding or a thinking budget. They change the distribution tokens are
    sampled from; the recorded log-probs include the change and the learner does not reproduce it, so
    MIS-PO's filters drop the tokens they change much. benchmarks/forced_lengths.py fixes response lengths
    with one."""
    engine: Literal["sync", "async"] = "sync"
    """'sync': `vllm.LLM`, one generate call at a time per actor. 'async': vLLM's AsyncLLM in an async actor,
    so batches submitted while others run are generated concurrently (its engine core always runs in a
    process of its own; `multiprocessing` then moves the model into a third process)."""
    partial_rollouts: bool = False
    """Async engine only: a weight update no longer waits for the requests in flight. It aborts them
    (vLLM's `pause_generation(mode="abort")`), loads the new weights, and continues each unfinished
    completion as a new request: the old prompt plus its tokens so far, prefilled again under the new
    weights (no KV cache of the old weights is reused), so every token's recorded log-prob comes from one
    weights version, the one in its `response_versions`. Single-turn only, and not with recorded routing
    (routing replay from the rollout, the MoE probe)."""
    multiprocessing: bool = False
    """Run vLLM's engine core in its own process (vLLM's default) instead of inside the actor."""
    enforce_eager: bool = True
    """Skip torch.compile in vLLM (faster to start and, for tiny models on CPU, faster to run)."""
    threads_bind: str = "nobind"
    """VLLM_CPU_OMP_THREADS_BIND for the engine: 'nobind', or a core list like '0' to pin it."""
    num_threads: int | None = Field(None, ge=1)
    """CPU threads of each engine with `threads_bind: nobind`; None = the actor's Ray CPUs (Ray sets
    OMP_NUM_THREADS to `cpus_per_worker`). In sync mode generation and training take turns, so each can use
    every core of the node (a 2-core machine: 2); in async mode they run at once."""
    weight_sync: Literal["object_store", "nccl", "gloo"] = "object_store"
    """How new weights reach the engines: 'object_store' (learner → driver → Ray's object store → engines;
    CPU and multi-node), or a broadcast from the learner's rank 0 straight into the engines over a private
    process group, skipping the driver: 'nccl' (GPUs) or 'gloo' (the same path over CPU tensors)."""
    bucket_mb: float = Field(64.0, gt=0)
    """Weights move in buckets of at most this many MiB, loaded one after another (a single fused unit,
    such as one layer's experts, that is larger travels alone)."""
    changed_only: bool = True
    """Skip the tensors whose content did not change since the last push (compared by digest)."""

    @model_validator(mode="after")
    def _check_logits_processors(self) -> RolloutConfig:
        bad = [name for name in self.logits_processors if name.count(":") != 1 or ":" in (name[0], name[-1])]
        if bad:
            raise ValueError(f"rollout.logits_processors: {bad} is not of the form 'module:Class'")
        return self

    @model_validator(mode="after")
    def _check_partial(self) -> RolloutConfig:
        if self.partial_rollouts and self.engine != "async":
            raise ValueError("rollout.partial_rollouts needs rollout.engine 'async' (vLLM's AsyncLLM)")
        return self
