"""`RolloutGroup`: N `RolloutWorker` Ray actors behind one generate / update_weights interface.

`submit` returns immediately (Ray futures), so the driver can keep generation running while the
learner trains (async mode); `collect` waits. Weights are serialised once, put in Ray's object store
once, and every engine loads the same object.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray

from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.weight_sync import serialize_state_dict
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
    def __init__(self, model_path: str | Path, config: RolloutConfig, version: int = 0) -> None:
        actor = ray.remote(num_cpus=config.cpus_per_worker)(RolloutWorker)
        self.config = config
        self.workers = [actor.remote(str(model_path), config, version) for _ in range(config.num_workers)]
        ray.get([w.get_version.remote() for w in self.workers])  # surface start-up errors here
        self.version = version

    def submit(self, prompts: list[Prompt], sampling: SamplingConfig | None = None) -> PendingRollouts:
        """Spread prompts over the workers in contiguous chunks (keeps each prompt's group together)."""
        chunks = _split(prompts, len(self.workers))
        refs = [
            w.generate.remote(chunk, sampling) for w, chunk in zip(self.workers, chunks, strict=True) if chunk
        ]
        return PendingRollouts(refs, time.perf_counter())

    def collect(self, pending: PendingRollouts) -> list[Rollout]:
        return [r for part in ray.get(pending.refs) for r in part]

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig | None = None) -> list[Rollout]:
        return self.collect(self.submit(prompts, sampling))

    def update_weights(self, state_dict: dict, version: int) -> dict[str, float]:
        """Push a state dict (HF/vLLM names) to every engine in place; returns bytes and seconds."""
        start = time.perf_counter()
        payload_ref = ray.put(serialize_state_dict(state_dict))
        per_worker = ray.get([w.update_weights.remote(payload_ref, version) for w in self.workers])
        self.version = version
        stats = dict(per_worker[0])
        stats["sync/total_seconds"] = time.perf_counter() - start
        return stats

    def shutdown(self) -> None:
        ray.get([w.shutdown.remote() for w in self.workers])
        for w in self.workers:
            ray.kill(w)
        self.workers = []


def _split(items: list, parts: int) -> list[list]:
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out
