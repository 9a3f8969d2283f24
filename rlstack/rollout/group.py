"""`RolloutGroup`: N rollout workers (Ray actors) behind one submit / collect / update_weights interface.

`submit` returns immediately (Ray futures), so the driver can keep generation running while the learner
trains (async mode); `collect` waits. With `engine: async` the workers are `AsyncRolloutWorker`s, which
generate several submitted batches concurrently. New weights go through `weight_sync` (rollout.sync:
bucketed, changed-only; object store, or a broadcast over NCCL / gloo) and every engine loads the same
buckets.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from rlstack.envs.config import EnvConfig, SandboxConfig
from rlstack.faults import ActorFailure, Deadlines, FaultsConfig, wait_all
from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.sync.backend import WeightSyncBackend
from rlstack.rollout.sync.plan import checkpoint_tensors
from rlstack.rollout.sync.push import make_backend
from rlstack.rollout.worker import Prompt, RolloutWorker
from rlstack.types import Rollout

logger = logging.getLogger(__name__)


class RolloutFailedError(RuntimeError):
    """A rollout worker failed and `faults.max_rollout_restarts` replacements were used up."""


@dataclass
class _Part:
    """One worker's share of a submitted call: what to re-dispatch if that worker fails."""

    slot: int
    prompts: list[Prompt]
    worker: Any  # the actor it was submitted to (the slot may hold a replacement by now)
    ref: ray.ObjectRef
    tokens: int  # the most tokens it may generate (its deadline scales with them)


class PendingRollouts:
    """Handle of a submitted generate call: per-worker parts in prompt order."""

    def __init__(
        self,
        parts: list[_Part],
        sampling: SamplingConfig | None,
        tools: bool,
        step: int | None,
        submitted_at: float,
    ) -> None:
        self.parts = parts
        self.sampling, self.tools, self.step = sampling, tools, step
        self.submitted_at = submitted_at

    @property
    def refs(self) -> list[ray.ObjectRef]:
        return [p.ref for p in self.parts]

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
        faults: FaultsConfig | None = None,
        replacement_path: str | Path | None = None,
    ) -> None:
        """`env`: multi-turn episodes with this environment (tools run in `sandbox`); None: single turns.
        `record_routing`: rollouts carry the engines' routed experts (MoE; rollout.routing_capture).
        `faults`: deadlines of the workers' calls and how many failed workers may be replaced.
        `replacement_path`: the checkpoint a replacement engine starts from before it receives the current
        weights (default `model_path`; the driver passes the run's initial policy, which is never pruned)."""
        if config.weight_sync == "nccl" and not ray.cluster_resources().get("GPU", 0):
            raise RuntimeError(
                "rollout.weight_sync='nccl' needs GPUs, and this Ray cluster has none: vLLM-CPU engines "
                "cannot receive NCCL broadcasts. Use rollout.weight_sync='object_store' on CPU."
            )
        gpus = config.gpus_per_worker
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
        remote = ray.remote(
            num_cpus=config.cpus_per_worker,
            num_gpus=gpus,
            max_restarts=0,
            resources=dict(config.ray_resources),
        )
        # Any: Ray's stubs give an actor handle's methods no `.remote`, so the handles are used untyped.
        actor: Any
        if config.engine == "async":
            from rlstack.rollout.async_worker import AsyncRolloutWorker

            actor = remote(AsyncRolloutWorker)
        else:
            actor = remote(RolloutWorker)
        self.config = config
        self.model_path = str(replacement_path or model_path)
        self.faults = faults or FaultsConfig()
        self.deadlines = Deadlines(
            self.faults, Deadlines.checkpoint_mb(model_path) if Path(model_path).is_dir() else 0.0
        )
        self._turns = env.max_turns if env is not None else 1  # a generate call's deadline scales with them
        self._spawn = lambda v, path=self.model_path: actor.remote(
            path, config, v, env, sandbox, record_routing
        )
        self.workers: list[Any] = [self._spawn(version, str(model_path)) for _ in range(config.num_workers)]
        self.version = version
        self.restarts = 0
        """Workers replaced so far (dead, hung past a deadline, failing a health check)."""
        self.lost_seconds = 0.0
        """Seconds from a failure's detection until its work was re-dispatched, summed."""
        self.failures: list[str] = []
        """What each replaced worker did (died / missed a deadline, in which call, at which step)."""
        self.on_replace: Callable[[list[int]], None] | None = None
        """Set by the driver: brings the replaced workers' engines (slots) to the current weights."""
        self._busy = [0] * len(self.workers)  # submitted, not yet collected calls per worker
        startup = self.deadlines.weights()
        try:  # surface start-up errors here
            self.info = wait_all([w.info.remote() for w in self.workers], self.names, "start", startup)
        except ActorFailure as failure:
            raise RolloutFailedError(f"the rollout engines did not start: {failure}") from failure
        self.weight_sync: WeightSyncBackend = self._make_backend()
        """How `update_weights` pushes. With 'nccl' / 'gloo' (broadcast) the push must run in the learner's
        rank-0 process (`pushes_from_learner`): rollout.sync.push `attach` hands this (picklable) object
        there and `push_policy` pushes from it."""

    def _make_backend(self) -> WeightSyncBackend:
        known = checkpoint_tensors(self.model_path) if Path(self.model_path).is_dir() else None
        backend = make_backend(
            self.config.weight_sync, self.workers, self.config.bucket_mb, self.config.changed_only, known
        )
        backend.timeout_s = self.deadlines.weights()
        return backend

    @property
    def names(self) -> list[str]:
        """How errors and logs name each worker."""
        info = getattr(self, "info", None)
        return [
            f"rollout worker {i}" + (f" (pid {info[i]['pid']}, node {info[i]['node'][:8]})" if info else "")
            for i in range(len(self.workers))
        ]

    # ---- generation ----------------------------------------------------------------------------

    def submit(
        self,
        prompts: list[Prompt],
        sampling: SamplingConfig | None = None,
        tools: bool = True,
        step: int | None = None,
    ) -> PendingRollouts:
        """Spread prompts over the workers in contiguous chunks (keeps each prompt's group together).
        `tools=False`: single turns even with an environment (the "without the tool" evaluation). `step`
        names the RL step in errors. Idle workers are health-checked first (a failed one is replaced)."""
        self.check_health()
        sampling = sampling or self.config.sampling
        chunks = _split(prompts, len(self.workers))
        parts = [self._dispatch(slot, chunk, sampling, tools) for slot, chunk in enumerate(chunks) if chunk]
        return PendingRollouts(parts, sampling, tools, step, time.perf_counter())

    def _dispatch(self, slot: int, prompts: list[Prompt], sampling: SamplingConfig, tools: bool) -> _Part:
        worker = self.workers[slot]
        self._busy[slot] += 1
        tokens = len(prompts) * sampling.n * sampling.max_tokens * (self._turns if tools else 1)
        return _Part(slot, prompts, worker, worker.generate.remote(prompts, sampling, tools), tokens)

    def collect(self, pending: PendingRollouts) -> list[Rollout]:
        """The rollouts of a submitted call, in prompt order. A worker that dies or misses the deadline is
        replaced (`faults.max_rollout_restarts`) and its share generated again by the replacement, so the
        call returns as many rollouts as it would have."""
        parts = pending.parts
        done: dict[int, list[Rollout]] = {}
        while len(done) < len(parts):
            todo = [i for i in range(len(parts)) if i not in done]
            started = time.monotonic()
            deadline = self.deadlines.generate(max(parts[i].tokens for i in todo))
            names = [self.names[parts[i].slot] for i in todo]
            try:
                results = wait_all([parts[i].ref for i in todo], names, "generate", deadline, pending.step)
            except ActorFailure as failure:
                for i in (todo[k] for k in failure.failed):
                    part = parts[i]
                    if self.workers[part.slot] is part.worker:  # not replaced yet (by another call)
                        self._replace(part.slot, failure)
                        self.lost_seconds += time.monotonic() - started
                    assert pending.sampling is not None
                    parts[i] = self._dispatch(part.slot, part.prompts, pending.sampling, pending.tools)
                continue
            for i, result in zip(todo, results, strict=True):
                done[i] = result
                self._busy[parts[i].slot] = max(0, self._busy[parts[i].slot] - 1)
        return [r for i in range(len(parts)) for r in done[i]]

    def abandon(self, pending: PendingRollouts) -> None:
        """Forget a submitted call (its results are never collected: a learner restart rolls back)."""
        for part in pending.parts:
            if self.workers[part.slot] is part.worker:
                self._busy[part.slot] = max(0, self._busy[part.slot] - 1)

    def generate(
        self, prompts: list[Prompt], sampling: SamplingConfig | None = None, tools: bool = True
    ) -> list[Rollout]:
        return self.collect(self.submit(prompts, sampling, tools))

    # ---- failures ------------------------------------------------------------------------------

    def check_health(self) -> list[int]:
        """Ping the idle workers (a busy sync worker answers only after its call); replace the dead and
        those that miss `faults.health_check_s`. Returns the replaced slots."""
        idle = [slot for slot, busy in enumerate(self._busy) if busy == 0]
        if not idle:
            return []
        names = [self.names[s] for s in idle]
        started = time.monotonic()
        try:
            wait_all(
                [self.workers[s].info.remote() for s in idle],
                names,
                "health check",
                self.faults.health_check_s,
            )
        except ActorFailure as failure:
            replaced = [idle[k] for k in failure.failed]
            for slot in replaced:
                self._replace(slot, failure)
            self.lost_seconds += time.monotonic() - started
            return replaced + self.check_health()  # the others may still fail theirs
        return []

    def _replace(self, slot: int, failure: ActorFailure) -> None:
        """Kill the worker in `slot`, start a fresh one on the current weights (via `on_replace`)."""
        if self.restarts >= self.faults.max_rollout_restarts:
            raise RolloutFailedError(
                f"{failure}; {self.restarts} rollout workers were replaced already, the most "
                f"faults.max_rollout_restarts = {self.faults.max_rollout_restarts} allows"
            ) from failure
        logger.error("%s; replacing it", failure)
        self.failures.append(str(failure))
        old, old_info = self.workers[slot], self.info[slot]
        with contextlib.suppress(Exception):  # already dead, or hung: killed either way
            ray.kill(old, no_restart=True)
        _reap(old_info)
        new = self._spawn(self.version)
        name = f"rollout worker {slot} (replacement)"
        self.info[slot] = wait_all([new.info.remote()], [name], "start", self.deadlines.weights())[0]
        self.workers[slot] = new
        self.weight_sync.workers[slot] = new
        self._busy[slot] = 0
        self.restarts += 1
        if self.on_replace is not None:
            self.on_replace([slot])
        logger.warning(
            "rollout worker %d replaced: now %s (%d so far)", slot, self.names[slot], self.restarts
        )

    def rebuild_weight_sync(self) -> WeightSyncBackend:
        """A fresh backend over the current workers (a broadcast group with a replaced member, or a new
        learner rank 0, must be made again); the next push sends everything."""
        self.weight_sync.close()
        self.weight_sync = self._make_backend()
        return self.weight_sync

    # ---- weights -------------------------------------------------------------------------------

    def update_weights(self, state_dict: dict, version: int) -> dict[str, float]:
        """Push a state dict (HF/vLLM names) to every engine in place; returns the sync metrics
        (`sync/bytes`, `sync/bytes_skipped`, `sync/buckets`, `sync/seconds`, ...)."""
        start = time.perf_counter()
        stats = self.weight_sync.push(state_dict, version)
        self.version = version
        stats["sync/total_seconds"] = time.perf_counter() - start
        return stats

    def load_weights_into(self, slots: list[int], state_dict: dict, version: int) -> None:
        """Every weight of `state_dict` into the engines of `slots` only (a replacement catching up),
        through the object store."""
        one_off = make_backend(
            "object_store", [self.workers[s] for s in slots], self.config.bucket_mb, changed_only=False
        )
        one_off.timeout_s = self.deadlines.weights()
        one_off.push(state_dict, version)

    def shutdown(self) -> None:
        """Close the engines (inside their actors, so nothing leaks), then kill the actors. Idempotent. A
        worker that does not close within the weights deadline is killed anyway."""
        if not self.workers:
            return
        if getattr(self, "weight_sync", None) is not None:
            self.weight_sync.close()
        refs = [w.shutdown.remote() for w in self.workers]
        _, hung = ray.wait(refs, num_returns=len(refs), timeout=self.faults.health_check_s)
        if hung:
            logger.error("%d rollout worker(s) did not close their engine in time; killing them", len(hung))
        for w in self.workers:
            ray.kill(w, no_restart=True)
        for info in getattr(self, "info", []):
            _reap(info)
        self.workers = []

    def __enter__(self) -> RolloutGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _reap(info: dict[str, Any]) -> None:
    """Kill what a killed worker's process left running on this node (a multiprocessing engine's core and
    model processes) and remove its engine's scratch dir: Ray kills only the actor's own process."""
    import psutil

    if info.get("node") != ray.get_runtime_context().get_node_id():
        if info.get("children") or info.get("scratch"):
            logger.warning(
                "engine processes %s and scratch dir %s on node %s may outlive their worker",
                info["children"], info.get("scratch"), info["node"],
            )  # fmt: skip
        return
    procs = []
    for pid in info.get("children", []):
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() <= info["time"]:  # the same process, not a reused pid
                proc.kill()
                procs.append(proc)
    psutil.wait_procs(procs, timeout=10)
    if info.get("scratch"):
        shutil.rmtree(info["scratch"], ignore_errors=True)


def _split(items: list, parts: int) -> list[list]:
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out
