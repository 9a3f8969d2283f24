"""`RolloutGroup`: N rollout workers (Ray actors) behind one submit / collect / update_weights interface.

`submit` returns immediately (Ray futures), so the driver can keep generation running while the learner
trains (async mode); `collect` waits. With `engine: async` the workers are `AsyncRolloutWorker`s, which
generate several submitted batches concurrently. New weights go through `weight_sync` (rollout.sync:
bucketed, changed-only; object store, or a broadcast over NCCL / gloo) and every engine loads the same
buckets.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray

from rlstack.envs.config import EnvConfig, SandboxConfig
from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.sync.backend import WeightSyncBackend
from rlstack.rollout.sync.plan import checkpoint_tensors
from rlstack.rollout.sync.push import make_backend
from rlstack.rollout.worker import Prompt, RolloutWorker
from rlstack.types import Rollout


class PendingRollouts:
    """Handle of a submitted generate call: per-worker futures in prompt order."""

    def __init__(self, refs: list[ray.ObjectRef], submitted_at: float) -> None:
        self.refs = refs
        self.submitted_at = submitted_at

    def ready(self) -> bool:
        done, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return len(done) == len(self.refs)


class RolloutGroup:
    def __init__(
        self,
        model_path: str | Path,
        config: RolloutConfig,
        version: int = 0,
        env: EnvConfig | None = None,
        sandbox: SandboxConfig | None = None,
        record_routing: bool = False,
    ) -> None:
        """`env`: multi-turn episodes with this environment (tools run in `sandbox`); None: single turns.
        `record_routing`: rollouts carry the engines' routed experts (MoE; rollout.routing_capture)."""
        if config.weight_sync == "nccl" and not ray.cluster_resources().get("GPU", 0):
            raise RuntimeError(
                "rollout.weight_sync='nccl' needs GPUs, and this Ray cluster has none: vLLM-CPU engines "
                "cannot receive NCCL broadcasts. Use rollout.weight_sync='object_store' on CPU."
            )
        gpus = config.gpus_per_worker
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
        remote = ray.remote(num_cpus=config.cpus_per_worker, num_gpus=gpus)
        # Any: Ray's stubs give an actor handle's methods no `.remote`, so the handles are used untyped.
        actor: Any
        if config.engine == "async":
            from rlstack.rollout.async_worker import AsyncRolloutWorker

            actor = remote(AsyncRolloutWorker)
        else:
            actor = remote(RolloutWorker)
        self.config = config
        self.workers = [
            actor.remote(str(model_path), config, version, env, sandbox, record_routing)
            for _ in range(config.num_workers)
        ]
        ray.get([w.get_version.remote() for w in self.workers])  # surface start-up errors here
        self.version = version
        self.weight_sync: WeightSyncBackend = make_backend(
            config.weight_sync,
            self.workers,
            config.bucket_mb,
            config.changed_only,
            # validate pushes against the checkpoint when the driver can read it (not a hub id)
            known=checkpoint_tensors(model_path) if Path(model_path).is_dir() else None,
        )
        """How `update_weights` pushes. With 'nccl' / 'gloo' (broadcast) the push must run in the learner's
        rank-0 process (`pushes_from_learner`): rollout.sync.push `attach` hands this (picklable) object
        there and `push_policy` pushes from it."""

    def submit(
        self, prompts: list[Prompt], sampling: SamplingConfig | None = None, tools: bool = True
    ) -> PendingRollouts:
        """Spread prompts over the workers in contiguous chunks (keeps each prompt's group together).
        `tools=False`: single turns even with an environment (the "without the tool" evaluation)."""
        chunks = _split(prompts, len(self.workers))
        refs = [
            w.generate.remote(chunk, sampling, tools)
            for w, chunk in zip(self.workers, chunks, strict=True)
            if chunk
        ]
        return PendingRollouts(refs, time.perf_counter())

    def collect(self, pending: PendingRollouts) -> list[Rollout]:
        return [r for part in ray.get(pending.refs) for r in part]

    def generate(
        self, prompts: list[Prompt], sampling: SamplingConfig | None = None, tools: bool = True
    ) -> list[Rollout]:
        return self.collect(self.submit(prompts, sampling, tools))

    def update_weights(self, state_dict: dict, version: int) -> dict[str, float]:
        """Push a state dict (HF/vLLM names) to every engine in place; returns the sync metrics
        (`sync/bytes`, `sync/bytes_skipped`, `sync/buckets`, `sync/seconds`, ...)."""
        start = time.perf_counter()
        stats = self.weight_sync.push(state_dict, version)
        self.version = version
        stats["sync/total_seconds"] = time.perf_counter() - start
        return stats

    def shutdown(self) -> None:
        """Close the engines (inside their actors, so nothing leaks), then kill the actors. Idempotent."""
        if not self.workers:
            return
        if getattr(self, "weight_sync", None) is not None:
            self.weight_sync.close()
        ray.get([w.shutdown.remote() for w in self.workers])
        for w in self.workers:
            ray.kill(w)
        self.workers = []

    def __enter__(self) -> RolloutGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _split(items: list, parts: int) -> list[list]:
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out
