"""`LearnerGroup`: `num_ranks` `LearnerWorker` Ray actors training one policy with DeepSpeed ZeRO.

The driver sees one learner: batches go in whole and are sharded by rows here (contiguous shards, results
concatenated back in order); metrics come back global. Needs `ray.init(...)` done by the caller.

    group = LearnerGroup(checkpoint_dir, LearnerConfig(num_ranks=2, zero_stage=2))
    batch = collate(rollouts, pad_id).replace(old_logp=group.compute_logprobs(batch), ...)  # + advantages
    result = group.train(batch, algo_cfg)                    # n_minibatches optimizer steps: TrainResult
    weights = group.export_weights()                         # {vLLM name: fp32 tensor}
    group.attach_weight_sync(rollout.weight_sync); group.push_weights(group.version)  # broadcast sync
    group.save_checkpoint(run_dir / "checkpoints/step_1"); group.shutdown()

With `learner.critic.enabled` (`algorithm.advantage: critic`): `values = group.compute_values(batch)`,
`adv, returns = compute_advantages(cfg, ..., values=values, truncated=batch.truncated)`, then
`group.train(batch.replace(advantages=adv, returns=returns), cfg)` also takes the critic's steps.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rlstack.faults import Deadlines, LearnerFailure, wait_all
from rlstack.learner.batch import PolicyBatch
from rlstack.learner.config import LearnerConfig
from rlstack.learner.logprobs import SamplingTransform
from rlstack.learner.train import TrainResult, check_train_batch
from rlstack.mispo import AlgorithmConfig

# Environment the actors should share with the driver even when Ray's workers were started elsewhere
# (compile caches, offline switches): see scripts/env.sh.
_FORWARDED_ENV = (
    "TORCH_EXTENSIONS_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
)
SETUP_TIMEOUT_S = 600.0


class LearnerGroup:
    """A data-parallel learner of `learner_cfg.num_ranks` Ray actors over the checkpoint at `model_path`.

    `run_env`: extra environment variables for the actors (set before DeepSpeed is imported there).
    `reference_path`: the checkpoint of the frozen KL reference policy (the run's initial policy, also
    after a resume); needed when `algorithm.kl_coef > 0`. `transform`: the sampling transformation
    (temperature, top-k/top-p) the rollout engines sample under; every log-prob is computed under it.
    `deadlines`: every call then fails within its deadline with a `LearnerFailure` naming the rank (also
    when a rank dies); None: calls wait as long as they take.
    """

    def __init__(
        self,
        model_path: str | Path,
        learner_cfg: LearnerConfig,
        run_env: Mapping[str, str] | None = None,
        *,
        reference_path: str | Path | None = None,
        transform: SamplingTransform | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        import ray

        from rlstack.learner.worker import LearnerWorker

        if not ray.is_initialized():
            raise RuntimeError("LearnerGroup needs a running Ray: call ray.init(...) first")
        self.cfg = learner_cfg
        self.model_path = Path(model_path)
        self.actors: list[Any] = []
        self._version = 0
        self.deadlines = deadlines
        self.info: list[dict[str, Any]] = []
        gpus = 1 if _wants_gpus(learner_cfg.backend, ray.cluster_resources()) else 0
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ} | dict(run_env or {})
        actor_cls = ray.remote(
            num_cpus=learner_cfg.cpus_per_rank, num_gpus=gpus, resources=dict(learner_cfg.ray_resources)
        )(LearnerWorker)
        n = learner_cfg.num_ranks
        ref = None if reference_path is None else str(reference_path)
        self.has_reference = ref is not None
        self.actors = [
            actor_cls.remote(
                str(model_path), learner_cfg, rank, n, env, reference_path=ref, transform=transform
            )
            for rank in range(n)
        ]
        try:
            self.info = self._call("info", timeout=SETUP_TIMEOUT_S)
            ips = [i["ip"] for i in self.info]
            # One node: loopback. Several: rank 0's node address. Rank 0 picks a port free on its node.
            addr = "127.0.0.1" if len(set(ips)) == 1 else ips[0]
            port = ray.get(self.actors[0].free_port.remote(), timeout=SETUP_TIMEOUT_S)
            self._call("setup", addr, port, timeout=SETUP_TIMEOUT_S)
            self.peak_flops = sum(self._call("peak_flops", timeout=SETUP_TIMEOUT_S))  # all ranks' FLOP/s
        except BaseException:
            self.shutdown()
            raise

    @property
    def num_ranks(self) -> int:
        return self.cfg.num_ranks

    @property
    def version(self) -> int:
        """Policy version: the number of `train` steps taken (restored by `load_checkpoint`)."""
        return self._version

    def _call(
        self, method: str, *args: Any, shards: list[Any] | None = None, timeout: float | None = None
    ) -> list[Any]:
        """`method(shards[r], *args)` (or `method(*args)` without `shards`) on every rank at once, as every
        collective needs; each rank's result, in rank order. A rank that dies, or misses `timeout`, raises
        a `LearnerFailure` naming it."""
        heads = [()] * self.num_ranks if shards is None else [(s,) for s in shards]
        calls = [getattr(a, method).remote(*h, *args) for a, h in zip(self.actors, heads, strict=True)]
        step = self._version + 1 if method in ("compute_logprobs", "compute_values", "train") else None
        return wait_all(calls, self.names, method, timeout, step, error=LearnerFailure)

    @property
    def names(self) -> list[str]:
        """How errors name each rank."""
        return [
            f"learner rank {r}" + (f" (pid {i['pid']}, node {i['node'][:8]})" if i else "")
            for r, i in enumerate(self.info or [{}] * self.num_ranks)
        ]

    def _batch_deadline(self, batch: PolicyBatch) -> float | None:
        return None if self.deadlines is None else self.deadlines.learner(len(batch) * batch.seq_len)

    def _weights_deadline(self) -> float | None:
        return None if self.deadlines is None else self.deadlines.weights()

    def _per_row(self, method: str, batch: PolicyBatch) -> torch.Tensor:
        """`method` on each rank's row shard of `batch`; the results concatenated back in batch order."""
        shards = _shards(batch, self.num_ranks)
        return torch.cat(self._call(method, shards=shards, timeout=self._batch_deadline(batch)))[: len(batch)]

    # ---- compute -------------------------------------------------------------------------------

    def compute_logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        """(B, L) log pi(token_t | < t) with the current weights (pi_old), rows in batch order."""
        return self._per_row("compute_logprobs", batch)

    def compute_values(self, batch: PolicyBatch) -> torch.Tensor:
        """(B, L) critic values V(s_t), aligned like `compute_logprobs` (position t: the state token t was
        sampled in; 0 at position 0 and on padding), rows in batch order. Needs `learner.critic.enabled`."""
        if not self.cfg.critic.enabled:
            raise ValueError(
                "compute_values needs the critic: set learner.critic.enabled: true "
                "(algorithm.advantage: critic uses it)"
            )
        return self._per_row("compute_values", batch)

    def train(
        self, batch: PolicyBatch, algo_cfg: AlgorithmConfig, *, old_logp_from_forward: bool = False
    ) -> TrainResult:
        """One policy update (`n_minibatches` optimizer steps) on the whole step batch; with a critic, first
        its `n_minibatches` steps on `batch.returns` (`critic/...` metrics).

        pi_old comes either from the batch (`batch.old_logp`, from `compute_logprobs`; `batch.filter` the
        step's `MISFilter` result, needed for a stateful trajectory filter) or, with
        `old_logp_from_forward`, from each rank's training forward (neither passed; needs
        `learner.n_minibatches` 1 and a stateless filter, then computed per micro-batch): the result then
        carries pi_old (B, L), so the caller can compute the step's batch-level MIS filter afterwards.
        Needs `batch.advantages`, and `batch.returns` exactly when `learner.critic.enabled`. Metrics are
        global, including batch counts."""
        check_train_batch(
            batch,
            algo_cfg,
            self.cfg,
            old_logp_from_forward=old_logp_from_forward,
            has_reference=self.has_reference,
        )
        per_rank: list[list[PolicyBatch]] = [[] for _ in range(self.num_ranks)]
        for minibatch in batch.split(self.cfg.n_minibatches):
            for r, shard in enumerate(_shards(minibatch, self.num_ranks)):
                per_rank[r].append(shard)
        results: list[TrainResult] = self._call(
            "train", algo_cfg, old_logp_from_forward, shards=per_rank, timeout=self._batch_deadline(batch)
        )
        metrics = dict(results[0].metrics)
        self._version = int(metrics["learner/version"])
        # staleness is measured (and bounded) once, by the driver's rule: rlstack.staleness
        metrics["batch/rows"] = float(len(batch))
        if not old_logp_from_forward:
            return TrainResult(metrics)
        old_logp = torch.cat([r.old_logp for r in results if r.old_logp is not None])  # (B', L)
        return TrainResult(metrics, old_logp[: len(batch)])

    def train_step(self, batch: PolicyBatch, algo_cfg: AlgorithmConfig) -> dict[str, float]:
        """The metrics of `train(batch, algo_cfg)` (pi_old in the batch)."""
        return self.train(batch, algo_cfg).metrics

    # ---- weights and checkpoints ---------------------------------------------------------------

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The policy's full fp32 state dict under the HF/vLLM checkpoint names (gathered from ZeRO-3
        shards); never the critic."""
        if self.cfg.zero_stage == 3:  # the gather is collective
            return self._call("export_weights", timeout=self._weights_deadline())[0]
        ref = self.actors[0].export_weights.remote()
        return wait_all(
            [ref], self.names[:1], "export_weights", self._weights_deadline(), error=LearnerFailure
        )[0]

    def attach_weight_sync(self, backend: Any) -> None:
        """Hand a broadcast weight-sync backend (`RolloutGroup.weight_sync` with `rollout.weight_sync`
        'nccl' or 'gloo') to rank 0, which then pushes straight into the engines (`push_weights`)."""

        self._call("attach_weight_sync", backend)

    def push_weights(self, version: int) -> dict[str, float]:
        """Rank 0 pushes the policy's weights into the engines through the attached backend (collective:
        every rank joins the ZeRO-3 gather); returns its sync metrics (`sync/bytes`, `sync/seconds`, ...)."""

        return self._call("push_weights", version, timeout=self._weights_deadline())[0]

    def critic_weights(self) -> dict[str, torch.Tensor]:
        """The critic's full fp32 state dict (`model.*` trunk, `value_head.*`); needs the critic."""

        if not self.cfg.critic.enabled:
            raise ValueError("critic_weights: learner.critic.enabled is false, there is no critic")
        return self._call("critic_weights")[0]

    def save_checkpoint(self, path: str | Path) -> Path:
        """HF-format policy + `trainer_state/` into `path` (see `LearnerWorker.save_checkpoint`)."""

        self._call("save_checkpoint", str(path), timeout=self._weights_deadline())
        return Path(path)

    def load_checkpoint(self, path: str | Path) -> int:
        """Exact resume from `save_checkpoint(path)`: weights, optimizer, RNG and version (the critic's
        weights and optimizer too, when enabled)."""

        self._version = self._call("load_checkpoint", str(path), timeout=self._weights_deadline())[0]
        return self._version

    def check_weight_broadcast(self, timeout_s: float = 60.0) -> list[float]:
        """Broadcast rank 0's weights to all ranks over a freshly created process group; per-rank checksums
        (all equal when it works). Raises ray's GetTimeoutError instead of hanging past `timeout_s`."""

        return self._call("weight_broadcast_check", timeout=timeout_s)

    def shutdown(self, graceful: bool = True) -> None:
        """Leave the process groups and kill the actors (idempotent). `graceful=False`: kill at once (a
        failed learner: a hung rank would only make the goodbye wait)."""
        import ray

        if not self.actors:
            return
        with contextlib.suppress(Exception):  # a dead or hung actor is killed below either way
            if graceful:
                ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    def __enter__(self) -> LearnerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _wants_gpus(backend: str, resources: Mapping[str, float]) -> bool:
    if backend == "auto":
        return resources.get("GPU", 0) > 0
    return backend == "nccl"


def _shards(batch: PolicyBatch, n: int) -> list[PolicyBatch]:
    """n contiguous row shards, each with >= 1 row: a batch smaller than n is padded with inert copies of
    its first row (loss mask 0), which train nothing and whose outputs the caller drops."""
    if len(batch) == 0:
        raise ValueError("empty batch: nothing to compute")
    if len(batch) < n:
        batch = PolicyBatch.cat([batch, *[batch.select(slice(0, 1)).inert_copy()] * (n - len(batch))])
    return batch.split(n)
