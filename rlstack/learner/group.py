"""`LearnerGroup`: `num_ranks` `LearnerWorker` Ray actors training one policy with DeepSpeed ZeRO.

The driver sees one learner: batches go in whole and are sharded by rows here (contiguous shards, results
concatenated back in order); metrics come back global. Needs `ray.init(...)` done by the caller.

    group = LearnerGroup(checkpoint_dir, LearnerConfig(num_ranks=2, zero_stage=2))
    batch = collate(rollouts, pad_id).replace(...)           # advantages, optionally old_logp / filter
    metrics = group.train_step(batch, algo_cfg)              # n_minibatches optimizer steps
    weights = group.export_weights()                         # {vLLM name: fp32 tensor}
    group.attach_weight_sync(rollout.weight_sync); group.push_weights(group.version)  # broadcast sync
    group.save_checkpoint(run_dir / "checkpoints/step_1"); group.shutdown()

With `learner.critic.enabled` (`algorithm.advantage: critic`): `values = group.compute_values(batch)`,
`adv, returns = compute_advantages(cfg, ..., values=values, truncated=batch.truncated)`, then
`group.train_step(batch.replace(advantages=adv, returns=returns), cfg)` also takes the critic's steps.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rlstack.learner.batch import PolicyBatch
from rlstack.learner.config import LearnerConfig
from rlstack.learner.logprobs import SamplingTransform
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
    """

    def __init__(
        self,
        model_path: str | Path,
        learner_cfg: LearnerConfig,
        run_env: Mapping[str, str] | None = None,
        *,
        reference_path: str | Path | None = None,
        transform: SamplingTransform | None = None,
    ) -> None:
        import ray

        from rlstack.learner.worker import LearnerWorker

        if not ray.is_initialized():
            raise RuntimeError("LearnerGroup needs a running Ray: call ray.init(...) first")
        self.cfg = learner_cfg
        self.model_path = Path(model_path)
        self.actors: list[Any] = []
        self._version = 0
        gpus = 1 if _wants_gpus(learner_cfg.backend, ray.cluster_resources()) else 0
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ} | dict(run_env or {})
        actor_cls = ray.remote(num_cpus=learner_cfg.cpus_per_rank, num_gpus=gpus)(LearnerWorker)
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
            ips = ray.get([a.node_ip.remote() for a in self.actors], timeout=SETUP_TIMEOUT_S)
            # One node: loopback. Several: rank 0's node address. Rank 0 picks a port free on its node.
            addr = "127.0.0.1" if len(set(ips)) == 1 else ips[0]
            port = ray.get(self.actors[0].free_port.remote(), timeout=SETUP_TIMEOUT_S)
            ray.get([a.setup.remote(addr, port) for a in self.actors], timeout=SETUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise

    @property
    def num_ranks(self) -> int:
        return self.cfg.num_ranks

    @property
    def version(self) -> int:
        """Policy version: the number of `train_step`s taken (restored by `load_checkpoint`)."""
        return self._version

    # ---- compute -------------------------------------------------------------------------------

    def compute_logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        """(B, L) log pi(token_t | < t) with the current weights (pi_old), rows in batch order."""
        import ray

        shards = _shards(batch, self.num_ranks)
        out = ray.get([a.compute_logprobs.remote(s) for a, s in zip(self.actors, shards, strict=True)])
        return torch.cat(out)[: len(batch)]

    def compute_values(self, batch: PolicyBatch) -> torch.Tensor:
        """(B, L) critic values V(s_t), aligned like `compute_logprobs` (position t: the state token t was
        sampled in; 0 at position 0 and on padding), rows in batch order. Needs `learner.critic.enabled`."""
        import ray

        if not self.cfg.critic.enabled:
            raise ValueError(
                "compute_values needs the critic: set learner.critic.enabled: true "
                "(algorithm.advantage: critic uses it)"
            )
        shards = _shards(batch, self.num_ranks)
        out = ray.get([a.compute_values.remote(s) for a, s in zip(self.actors, shards, strict=True)])
        return torch.cat(out)[: len(batch)]

    def train_step(self, batch: PolicyBatch, algo_cfg: AlgorithmConfig) -> dict[str, float]:
        """One policy update (`n_minibatches` optimizer steps) on the whole step batch; with a critic, first
        its `n_minibatches` steps on `batch.returns` (`critic/...` metrics).

        Needs `batch.advantages`, and `batch.returns` exactly when `learner.critic.enabled`. Fills in what
        is missing: `old_logp` (recomputed with the current weights; `train_step_old_from_forward` skips
        that pass) and, for stateless trajectory filters (`fixed`/`off`), the MIS filter over the whole
        batch, so its metrics are batch-level. Stateful filters (`adaptive`/`stochastic`) must come from
        the caller's long-lived `MISFilter`. Returns global metrics, including batch counts and staleness.
        """
        from rlstack.learner.critic import check_critic_inputs
        from rlstack.mispo import apply_filters

        if batch.advantages is None:
            raise ValueError(
                "train_step: batch.advantages is None; set them (rlstack.mispo.compute_advantages)"
            )
        check_critic_inputs(batch, enabled=self.cfg.critic.enabled)
        if batch.old_logp is None:
            batch = batch.replace(old_logp=self.compute_logprobs(batch))
        if batch.filter is None and algo_cfg.traj_filter in ("fixed", "off"):
            band = algo_cfg.traj_band if algo_cfg.traj_filter == "fixed" else None
            old, rollout, mask = batch.old_logp, batch.rollout_logp, batch.loss_mask
            assert old is not None
            batch = batch.replace(filter=apply_filters(old, rollout, mask, algo_cfg.token_band, band))
        if batch.filter is None and (algo_cfg.name == "mispo" or algo_cfg.baseline_mis_masks):
            raise ValueError(
                f"algorithm.traj_filter = '{algo_cfg.traj_filter}' is stateful: pass the step's "
                "MISFilter(cfg)(old_logp, rollout_logp, loss_mask) result as batch.filter"
            )
        return self._train(batch, algo_cfg, old_from_forward=False)[0]

    def train_step_old_from_forward(
        self, batch: PolicyBatch, algo_cfg: AlgorithmConfig
    ) -> tuple[dict[str, float], torch.Tensor]:
        """`train_step` without the separate pi_old pass: each rank takes pi_old from its training forward
        (exact before the step's only optimizer step; needs `learner.n_minibatches` 1 and a stateless
        trajectory filter, `fixed` or `off`, computed per micro-batch). Returns (metrics, pi_old (B, L)),
        so the caller can compute the step's batch-level MIS filter afterwards, for metrics and samples."""
        from rlstack.learner.step import STATELESS_TRAJ_FILTERS, old_logp_from_forward_is_exact

        if batch.old_logp is not None or batch.filter is not None:
            raise ValueError("train_step_old_from_forward computes pi_old and the filter: pass neither")
        if not old_logp_from_forward_is_exact(self.cfg.n_minibatches, algo_cfg):
            raise ValueError(
                "pi_old from the training forward needs learner.n_minibatches 1 (got "
                f"{self.cfg.n_minibatches}) and algorithm.traj_filter in {STATELESS_TRAJ_FILTERS} (got "
                f"'{algo_cfg.traj_filter}'); use train_step"
            )
        if batch.advantages is None:
            raise ValueError(
                "train_step: batch.advantages is None; set them (rlstack.mispo.compute_advantages)"
            )
        metrics, old_logp = self._train(batch, algo_cfg, old_from_forward=True)
        assert old_logp is not None
        return metrics, old_logp

    def _train(
        self, batch: PolicyBatch, algo_cfg: AlgorithmConfig, old_from_forward: bool
    ) -> tuple[dict[str, float], torch.Tensor | None]:
        """Shard each mini-batch over the ranks, train, and add batch-level counts and staleness."""
        import ray

        n_mini = self.cfg.n_minibatches
        if algo_cfg.kl_coef > 0.0 and not self.has_reference and batch.ref_logp is None:
            raise ValueError(
                f"algorithm.kl_coef = {algo_cfg.kl_coef} needs the frozen reference policy: build the "
                "LearnerGroup with reference_path= (the run's initial policy)"
            )
        if n_mini > len(batch):
            raise ValueError(f"learner.n_minibatches = {n_mini} but the batch has only {len(batch)} rows")
        per_rank: list[list[PolicyBatch]] = [[] for _ in range(self.num_ranks)]
        for minibatch in batch.split(n_mini):
            for r, shard in enumerate(_shards(minibatch, self.num_ranks)):
                per_rank[r].append(shard)
        versions_before = self._version
        results = ray.get(
            [
                a.train_step_old_from_forward.remote(s, algo_cfg, old_from_forward)
                for a, s in zip(self.actors, per_rank, strict=True)
            ]
        )
        metrics = dict(results[0][0])
        self._version = int(metrics["learner/version"])
        staleness = (versions_before - batch.oldest_versions()).float()  # (B,)
        metrics |= {
            "batch/rows": float(len(batch)),
            "batch/staleness_mean": float(staleness.mean()),
            "batch/staleness_max": float(staleness.max()),
        }
        if not old_from_forward:
            return metrics, None
        return metrics, torch.cat([old for _, old in results])[: len(batch)]

    # ---- weights and checkpoints ---------------------------------------------------------------

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The policy's full fp32 state dict under the HF/vLLM checkpoint names (gathered from ZeRO-3
        shards); never the critic."""
        import ray

        if self.cfg.zero_stage == 3:  # the gather is collective
            return ray.get([a.export_weights.remote() for a in self.actors])[0]
        return ray.get(self.actors[0].export_weights.remote())

    def attach_weight_sync(self, backend: Any) -> None:
        """Hand a broadcast weight-sync backend (`RolloutGroup.weight_sync` with `rollout.weight_sync`
        'nccl' or 'gloo') to rank 0, which then pushes straight into the engines (`push_weights`)."""
        import ray

        ray.get([a.attach_weight_sync.remote(backend) for a in self.actors])

    def push_weights(self, version: int) -> dict[str, float]:
        """Rank 0 pushes the policy's weights into the engines through the attached backend (collective:
        every rank joins the ZeRO-3 gather); returns its sync metrics (`sync/bytes`, `sync/seconds`, ...)."""
        import ray

        return ray.get([a.push_weights.remote(version) for a in self.actors])[0]

    def critic_weights(self) -> dict[str, torch.Tensor]:
        """The critic's full fp32 state dict (`model.*` trunk, `value_head.*`); needs the critic."""
        import ray

        if not self.cfg.critic.enabled:
            raise ValueError("critic_weights: learner.critic.enabled is false, there is no critic")
        return ray.get([a.critic_weights.remote() for a in self.actors])[0]

    def save_checkpoint(self, path: str | Path) -> Path:
        """HF-format policy + `trainer_state/` into `path` (see `LearnerWorker.save_checkpoint`)."""
        import ray

        ray.get([a.save_checkpoint.remote(str(path)) for a in self.actors])
        return Path(path)

    def load_checkpoint(self, path: str | Path) -> int:
        """Exact resume from `save_checkpoint(path)`: weights, optimizer, RNG and version (the critic's
        weights and optimizer too, when enabled)."""
        import ray

        versions = ray.get([a.load_checkpoint.remote(str(path)) for a in self.actors])
        self._version = versions[0]
        return self._version

    def check_weight_broadcast(self, timeout_s: float = 60.0) -> list[float]:
        """Broadcast rank 0's weights to all ranks over a freshly created process group; per-rank checksums
        (all equal when it works). Raises ray's GetTimeoutError instead of hanging past `timeout_s`."""
        import ray

        return ray.get([a.weight_broadcast_check.remote() for a in self.actors], timeout=timeout_s)

    def shutdown(self) -> None:
        """Leave the process groups and kill the actors (idempotent)."""
        import ray

        if not self.actors:
            return
        with contextlib.suppress(Exception):  # a dead or hung actor is killed below either way
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
