"""`RewardGroup`: reward plugins scored by Ray actors, batched and concurrent, each call under a time limit,
failures isolated to their samples, results cached.

The one scoring path: training, `rlstack eval` and `rlstack rewards try` hand a batch (TRL-style, built by
`rlstack.rewards.scoring`) to `RewardGroup(prompts, completions, sample_ids=..., **columns)` and get
`GroupRewards` back. Inside:

- samples are routed to workers by a hash of their prompt, so a repeated sample meets the same worker's
  cache and a prompt's group is scored together, in chunks of about `chunk_size`, all workers at once;
- each worker (`RewardScorer`) calls each plugin on its chunk in a thread with a deadline of
  `time_limit_s`; a plugin that raises, returns bad output or misses the deadline is called again per
  sample, all samples concurrently, each under the same deadline, so one bad sample costs only itself
  (None, with the error in the sample's info and the log, naming the plugin and the sample's prompt id);
- a thread that misses its deadline cannot be killed, so it is abandoned; a worker with more than
  `max_abandoned_threads` of them still running, or one that does not answer at all (a plugin holding the
  GIL in C code), is killed and replaced — its samples score None — and training goes on; a worker that
  dies under a chunk (killed, out of memory, a plugin crashing the process) is replaced and the chunk
  scored once more by the replacement (None only if that dies too);
- a factory spec (`factory: true`) is called once per worker, when the worker starts;
- scores are cached per worker by (plugin, plugin version, options, prompt, completion, columns); failures
  are not cached. A plugin marks its own timeouts with a "timeout" key in a sample's info (`RewardResult`);
  they count in `timeouts` too.

`reward_workers.num_workers: 0` (or `RewardGroup.in_process`) runs the same `RewardScorer` in the calling
process (no Ray actors), with the same deadlines and cache.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlstack.envs.backends import configure as configure_sandbox
from rlstack.envs.backends import resolve_backend, run_sandbox
from rlstack.envs.config import SandboxConfig
from rlstack.rewards.config import RewardSpec, RewardWorkersConfig
from rlstack.rewards.registry import (
    CombinedRewards,
    Info,
    RewardError,
    RewardFn,
    RewardOutput,
    call_reward_with_info,
    combine,
    failure_info,
    load_plugin,
    needs_sandbox,
    resolve,
    sample_name,
    validate_specs,
)

logger = logging.getLogger(__name__)


@dataclass
class ChunkResult:
    """One worker's scores for one chunk, per plugin label."""

    per_reward: dict[str, RewardOutput]
    info: dict[str, Info]
    errors: dict[str, int]
    timeouts: dict[str, int]
    cache_hits: int = 0
    abandoned_threads: int = 0
    """Timed-out plugin calls of this worker whose threads are still running."""


@dataclass
class GroupRewards(CombinedRewards):
    """`CombinedRewards` plus what the reward workers saw."""

    timeouts: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    workers_restarted: int = 0


class _Timeout(Exception):
    pass


class RewardScorer:
    """Scores chunks with every configured plugin: deadlines, per-sample isolation, an LRU cache.

    A plain class: `RewardGroup` hosts one per Ray actor, or one in-process with `num_workers: 0`.
    """

    def __init__(
        self,
        specs: Sequence[RewardSpec],
        config: RewardWorkersConfig | None = None,
        sandbox: SandboxConfig | None = None,
    ) -> None:
        validate_specs(specs)
        self.specs = list(specs)
        self.config = config or RewardWorkersConfig()
        self.fns = [resolve(s) for s in self.specs]
        if sandbox is not None:
            configure_sandbox(sandbox)
        if needs_sandbox(self.specs):
            run_sandbox()  # built now: a host that cannot give the run's isolation fails at start-up
        # A factory's product is versioned by the factory and its options.
        self.versions = [
            plugin_version(functools.partial(load_plugin(s), **s.options) if s.factory else fn)
            for s, fn in zip(self.specs, self.fns, strict=True)
        ]
        self._cache: OrderedDict[str, tuple[float | None, dict[str, Any] | None]] = OrderedDict()
        self._abandoned: list[threading.Thread] = []

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        """This worker's process id (tests inject faults with it)."""
        import os

        return os.getpid()

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        columns: dict[str, list[Any]],
        sample_ids: Sequence[str] | None = None,
    ) -> ChunkResult:
        """Every plugin's scores for one chunk; `sample_ids` (prompt ids) only name failed samples."""
        result = ChunkResult({}, {}, {}, {})
        for spec, fn, version in zip(self.specs, self.fns, self.versions, strict=True):
            keys = [
                self._key(spec.label, version, p, c, {k: v[i] for k, v in columns.items()})
                for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
            ]
            scores: RewardOutput = [None] * len(keys)
            info: Info = [None] * len(keys)
            todo = []
            for i, key in enumerate(keys):
                if key in self._cache:
                    self._cache.move_to_end(key)
                    scores[i], info[i] = self._cache[key]
                    result.cache_hits += 1
                else:
                    todo.append(i)
            errors = timeouts = 0
            if todo:
                sub_columns = {k: [v[i] for i in todo] for k, v in columns.items()}
                sub_ids = None if sample_ids is None else [sample_ids[i] for i in todo]
                out, out_info, errors, timeouts = self._call(
                    fn,
                    spec.label,
                    [prompts[i] for i in todo],
                    [completions[i] for i in todo],
                    sub_columns,
                    sub_ids,
                )
                for j, i in enumerate(todo):
                    scores[i], info[i] = out[j], out_info[j]
                    details = out_info[j] or {}
                    if "timeout" in details:  # the plugin's own time limit (e.g. math's sympy check)
                        timeouts += 1
                    if "error" not in details and "timeout" not in details:  # failures are retried later
                        self._remember(keys[i], out[j], out_info[j])
            result.per_reward[spec.label], result.info[spec.label] = scores, info
            result.errors[spec.label], result.timeouts[spec.label] = errors, timeouts
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        result.abandoned_threads = len(self._abandoned)
        return result

    # ---- one plugin on one chunk ----------------------------------------------------------------------

    def _call(
        self,
        fn: RewardFn,
        label: str,
        prompts: list[Any],
        completions: list[Any],
        columns: dict[str, list[Any]],
        sample_ids: Sequence[str] | None = None,
    ) -> tuple[RewardOutput, Info, int, int]:
        """(scores, info, failed samples, timed-out samples): the chunk at once, else sample by sample."""
        limit = self.config.time_limit_s
        n = len(prompts)
        try:
            scores, info = self._with_deadline(
                functools.partial(call_reward_with_info, fn, prompts, completions, name=label, **columns),
                limit,
            )
            return scores, info, 0, 0
        except _Timeout:
            logger.error(
                "reward '%s' timed out (> %.3g s) on a chunk of %d; retrying per sample", label, limit, n
            )
        except Exception as e:  # a user plugin: any exception is the plugin's, not ours
            logger.error("reward '%s' failed on a chunk of %d (%s); retrying per sample", label, n, e)
        # Per sample, all at once: a plugin that hangs on every sample costs one deadline, not n.
        boxes = [
            self._start(
                functools.partial(
                    call_reward_with_info,
                    fn,
                    [prompts[i]],
                    [completions[i]],
                    name=label,
                    **{k: [v[i]] for k, v in columns.items()},
                )
            )
            for i in range(n)
        ]
        deadline = time.monotonic() + limit
        scores, info = [], []
        failed = timed_out = 0
        for i, (thread, box) in enumerate(boxes):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                self._abandoned.append(thread)
                timed_out += 1
                error = f"timeout: no result within {limit:g} s"
            elif "error" in box:
                error = f"{type(box['error']).__name__}: {box['error']}"
            else:
                scores.extend(box["value"][0])
                info.extend(box["value"][1])
                continue
            failed += 1
            scores.append(None)
            info.append(failure_info(error, i, sample_ids))
            logger.error("reward '%s' failed on %s: %s", label, sample_name(i, sample_ids), error)
        return scores, info, failed, timed_out

    def _with_deadline(self, call: Callable[[], Any], limit: float) -> Any:
        thread, box = self._start(call)
        thread.join(limit)
        if thread.is_alive():
            self._abandoned.append(thread)
            raise _Timeout
        if "error" in box:
            raise box["error"]
        return box["value"]

    @staticmethod
    def _start(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = call()
            except BaseException as e:  # handed to the waiting thread
                box["error"] = e

        thread = threading.Thread(target=target, name="rlstack-reward", daemon=True)
        thread.start()
        return thread, box

    # ---- cache ----------------------------------------------------------------------------------------

    def _key(self, label: str, version: str, prompt: Any, completion: Any, row: dict[str, Any]) -> str:
        payload = json.dumps([label, version, prompt, completion, row], sort_keys=True, default=repr)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _remember(self, key: str, score: float | None, info: dict[str, Any] | None) -> None:
        if self.config.cache_size == 0:
            return
        self._cache[key] = (score, info)
        if len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)


class RewardGroup:
    """The handle on reward scoring: the configured rewards' weighted sum over a batch, per-reward scores,
    failures and details (see the module docstring).

    >>> group = RewardGroup.in_process([RewardSpec(name="puzzle", weight=2.0)])
    >>> group(["p"], ["\\\\boxed{2*3+4}"], numbers=[[2, 3, 4]], target=[10]).total
    [2.0]
    """

    def __init__(
        self,
        specs: Sequence[RewardSpec],
        config: RewardWorkersConfig | None = None,
        sandbox: SandboxConfig | None = None,
    ) -> None:
        validate_specs(specs)  # fail fast, in the driver, on an unknown plugin or a bad option
        self.specs = list(specs)
        self.config = config or RewardWorkersConfig()
        self.sandbox = sandbox
        if needs_sandbox(self.specs):
            # here too, not only in the workers: a host without the run's isolation fails in one line
            resolve_backend(sandbox or SandboxConfig())
        self.restarts = 0
        self._local = RewardScorer(specs, self.config, sandbox) if self.config.num_workers == 0 else None
        self._workers = [self._spawn() for _ in range(self.config.num_workers)]
        if self._workers:
            import ray

            try:
                ray.get([w.ready.remote() for w in self._workers])
            except Exception as error:
                self.shutdown()
                raise RewardError(
                    f"reward workers could not load the reward plugins ({error}). A plugin's module must be "
                    "importable in Ray workers: run from its directory, set PYTHONPATH, or ship it with "
                    "`ray job submit --working-dir`"
                ) from error

    @classmethod
    def in_process(
        cls,
        specs: Sequence[RewardSpec],
        config: RewardWorkersConfig | None = None,
        sandbox: SandboxConfig | None = None,
    ) -> RewardGroup:
        """A group scoring in this process (no Ray): `config`'s deadlines and cache, `num_workers: 0`."""
        return cls(specs, (config or RewardWorkersConfig()).model_copy(update={"num_workers": 0}), sandbox)

    def _spawn(self) -> Any:
        import ray

        actor = ray.remote(
            num_cpus=self.config.cpus_per_worker,
            max_restarts=0,
            resources=dict(self.config.ray_resources),
        )(RewardScorer)
        return actor.remote(self.specs, self.config, self.sandbox)

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        sample_ids: Sequence[str] | None = None,
        **columns: Any,
    ) -> GroupRewards:
        """Score a batch. `sample_ids`: each sample's prompt id, never passed to a plugin, only naming
        failed samples in logs and info."""
        n = len(completions)
        ids = "" if sample_ids is None else f", {len(sample_ids)} sample_ids"
        lengths = [len(prompts), *(len(v) for v in columns.values())]
        if sample_ids is not None:
            lengths.append(len(sample_ids))
        if any(length != n for length in lengths):
            raise ValueError(
                f"reward batch: {len(prompts)} prompts, {n} completions{ids}, columns of other lengths"
            )
        chunks = self._chunks(prompts, completions)
        results = self._score_chunks(chunks, prompts, completions, columns, sample_ids)
        return self._merge(n, chunks, results, sample_ids)

    def _chunks(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[tuple[int, list[int]]]:
        """(worker index, sample indices) pairs. A prompt's samples stay together (a group-relative reward,
        e.g. genrm's pairwise win rates, sees the whole group) on the worker the prompt's hash picks (so a
        repeated sample meets that worker's cache); chunks fill up with whole groups to `chunk_size`."""
        workers = max(1, len(self._workers))
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(json.dumps(p, default=repr), []).append(i)
        chunks: list[tuple[int, list[int]]] = []
        open_chunk: dict[int, list[int]] = {}
        for key, ids in groups.items():
            w = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % workers
            current = open_chunk.get(w)
            if current is not None and len(current) + len(ids) > self.config.chunk_size:
                chunks.append((w, current))
                current = None
            open_chunk[w] = (current or []) + ids
        chunks.extend(open_chunk.items())
        return chunks

    def _score_chunks(
        self,
        chunks: list[tuple[int, list[int]]],
        prompts: Sequence[Any],
        completions: Sequence[Any],
        columns: dict[str, Any],
        sample_ids: Sequence[str] | None,
    ) -> list[ChunkResult | None]:
        def args(ids: list[int]) -> tuple[list[Any], list[Any], dict[str, list[Any]], list[str] | None]:
            return (
                [prompts[i] for i in ids],
                [completions[i] for i in ids],
                {k: [v[i] for i in ids] for k, v in columns.items()},
                None if sample_ids is None else [sample_ids[i] for i in ids],
            )

        if self._local is not None:
            return [self._local.score(*args(ids)) for _, ids in chunks]

        results: list[ChunkResult | None] = [None] * len(chunks)
        todo = list(range(len(chunks)))
        for attempt in range(2):  # a chunk whose worker died is scored again once, by its replacement
            died = self._score_once([chunks[c] for c in todo], args, results, todo)
            if not died or attempt == 1:
                break
            logger.error("scoring %d chunk(s) again on the replacement worker(s)", len(died))
            todo = died
        return results

    def _score_once(
        self,
        chunks: list[tuple[int, list[int]]],
        args: Callable[[list[int]], tuple[Any, ...]],
        results: list[ChunkResult | None],
        slots: list[int],
    ) -> list[int]:
        """Score `chunks` on their workers into `results[slots[i]]`; replace dead and hung workers. Returns
        the slots whose worker died under them (their chunks may be scored again)."""
        import ray

        refs = [self._workers[w].score.remote(*args(ids)) for w, ids in chunks]
        # A worker answers within two deadlines per plugin per chunk it holds (chunk call, then per-sample).
        per_worker = max((sum(1 for w, _ in chunks if w == k) for k in range(len(self._workers))), default=0)
        budget = 2 * self.config.time_limit_s * len(self.specs) * per_worker + 30.0
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=budget)
        done = set(ready)
        stuck: set[int] = set()
        died: list[int] = []
        for (w, _), ref, slot in zip(chunks, refs, slots, strict=True):
            result = None
            if ref in done:
                try:
                    result = ray.get(ref)
                except Exception as error:  # the actor died (killed, or a plugin crashed the process)
                    logger.error("reward worker %d failed: %s", w, error)
                    stuck.add(w)
                    died.append(slot)
            else:
                logger.error("reward worker %d did not answer within %.0f s; replacing it", w, budget)
                stuck.add(w)
            if result is not None and result.abandoned_threads > self.config.max_abandoned_threads:
                logger.error(
                    "reward worker %d has %d hung plugin calls; replacing it", w, result.abandoned_threads
                )
                stuck.add(w)
            results[slot] = result
        for w in sorted(stuck):
            ray.kill(self._workers[w], no_restart=True)
            self._workers[w] = self._spawn()
            self.restarts += 1
        return died

    def _merge(
        self,
        n: int,
        chunks: list[tuple[int, list[int]]],
        results: list[ChunkResult | None],
        sample_ids: Sequence[str] | None,
    ) -> GroupRewards:
        labels = [s.label for s in self.specs]
        per_reward: dict[str, RewardOutput] = {label: [None] * n for label in labels}
        info: dict[str, Info] = {label: [None] * n for label in labels}
        errors = dict.fromkeys(labels, 0)
        timeouts = dict.fromkeys(labels, 0)
        hits = 0
        for (_, ids), result in zip(chunks, results, strict=True):
            for label in labels:
                if result is None:  # the worker was lost: every sample of the chunk fails
                    errors[label] += len(ids)
                    for i in ids:
                        info[label][i] = failure_info("reward worker lost (hung or crashed)", i, sample_ids)
                    continue
                for j, i in enumerate(ids):
                    per_reward[label][i] = result.per_reward[label][j]
                    info[label][i] = result.info[label][j]
                errors[label] += result.errors[label]
                timeouts[label] += result.timeouts[label]
            hits += 0 if result is None else result.cache_hits
        total = combine(per_reward, {s.label: s.weight for s in self.specs})
        return GroupRewards(total, per_reward, errors, info, timeouts, hits, self.restarts)

    def shutdown(self) -> None:
        if not self._workers:  # in-process: nothing to stop
            return
        import ray

        for worker in self._workers:
            ray.kill(worker, no_restart=True)
        self._workers = []


def plugin_version(fn: Any) -> str:
    """What invalidates cached scores: `__version__` of the plugin or its package, else a hash of its source;
    plus any bound options."""
    options = ""
    if isinstance(fn, functools.partial):
        options = json.dumps(fn.keywords, sort_keys=True, default=repr)
        fn = fn.func
    version = getattr(fn, "__version__", None)
    if version is None:
        module = inspect.getmodule(fn)
        version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]
        except (OSError, TypeError):
            version = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    return f"{version}|{options}"
