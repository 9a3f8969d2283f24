"""`LearnerWorker`: one data-parallel rank of the policy learner (a DeepSpeed engine), run as a Ray actor.

`LearnerGroup` wraps this class with `ray.remote`; it is a plain class, so one rank can also run in-process.
Lifecycle: `__init__` (cheap) -> `setup(master_addr, master_port)` on every rank at once (process group,
model, ZeRO engine) -> `compute_logprobs` / `train_step` / `export_weights` / `save_checkpoint` ->
`shutdown`. Every method that touches parameters is collective under ZeRO-3: call it on all ranks.

With `learner.critic.enabled` the rank holds a second engine, the critic (`critic.ValueModel`): same ZeRO
stage and process group, its own AdamW. `compute_values` scores with it, `train_step` takes a critic step
before the policy step, checkpoints carry its full state; `export_weights` stays the policy only.
One DeepSpeed process group per process: build one worker per process (DeepSpeed caches its groups).

Process group: we create it ourselves with `torch.distributed.init_process_group` WITHOUT `device_id`
and only then call `deepspeed.init_distributed`, which adopts it. DeepSpeed >= 0.17.3 binds `device_id`
on CUDA, which has been reported to hang the weight sync that follows the first training step when
other process groups are created later (allenai/open-instruct#1311, deepspeedai/DeepSpeed#7266, #7542).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import socket
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rlstack.learner.batch import PolicyBatch
from rlstack.learner.config import LearnerConfig
from rlstack.learner.critic import (
    CRITIC_SUMMED,
    ValueModel,
    accumulate_critic_minibatch,
    check_critic_inputs,
    finish_critic_metrics,
)
from rlstack.learner.logprobs import SamplingTransform, score_tokens
from rlstack.learner.reference import frozen_reference, shard_numel
from rlstack.learner.schedule import lr_at
from rlstack.learner.step import (
    COUNTED,
    SUMMED,
    DistReducer,
    MetricSums,
    accumulate_minibatch,
    iter_minibatches,
    padded_micro_batches,
)
from rlstack.mispo import AlgorithmConfig

PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)
# Files of an HF checkpoint directory that `save_pretrained` writes itself; everything else at the top
# level (tokenizer.json, tokenizer_config.json, chat_template.jinja, ...) is copied from the source.
_WEIGHT_FILES = ("config.json", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt")


def free_port() -> int:
    """A TCP port that is free on this host right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def resolve_backend(backend: str, cuda_available: bool) -> str:
    """`auto` -> nccl with CUDA, gloo without; an explicit choice is checked against the hardware."""
    if backend == "auto":
        return "nccl" if cuda_available else "gloo"
    if backend == "nccl" and not cuda_available:
        raise ValueError("learner.backend = 'nccl' needs a CUDA GPU per rank; use 'gloo' (or 'auto') on CPU")
    return backend


def learner_threads(cfg: LearnerConfig) -> int:
    """torch threads of one learner rank: `num_threads`, else its whole reserved CPUs (at least 1)."""
    return cfg.num_threads if cfg.num_threads is not None else max(1, math.floor(cfg.cpus_per_rank))


def deepspeed_config(cfg: LearnerConfig, lr: float | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg` (with learning rate `lr` instead of `cfg.lr`: the critic's).
    Accumulation is driven by the caller (boundaries set per micro-batch, `scale_wrt_gas=False`), so
    DeepSpeed's own accumulation count stays 1."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2):
        # DeepSpeed's default buckets are 5e8 elements (2 GB of fp32 staging per rank): far more than we need.
        zero |= {"reduce_bucket_size": int(2e7), "allgather_bucket_size": int(2e7)}
    if cfg.zero_stage == 3:
        zero |= {"reduce_bucket_size": int(2e7), "stage3_prefetch_bucket_size": int(2e7)}
    # bf16 parameters: DeepSpeed keeps fp32 master weights in the (ZeRO) optimizer and casts the update back
    bf16 = {"bf16": {"enabled": True}} if cfg.dtype == "bfloat16" else {}
    return bf16 | {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr if lr is None else lr,
                "betas": list(cfg.betas),
                "eps": cfg.adam_eps,
                "weight_decay": cfg.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on norm weights and other vectors (empty groups dropped)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay == 0.0:
        return [{"params": params}]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class _EngineSink:
    """Gradient accumulation through a DeepSpeed engine; the step owns the accumulation boundary."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def begin(self, is_last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(is_last)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)


class LearnerWorker:
    """One learner rank. See the module docstring for the lifecycle."""

    def __init__(
        self,
        model_path: str,
        cfg: LearnerConfig,
        rank: int = 0,
        world_size: int = 1,
        env: Mapping[str, str] | None = None,
        *,
        reference_path: str | None = None,
        transform: SamplingTransform | None = None,
    ) -> None:
        os.environ.update(env or {})
        self.model_path = Path(model_path)
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.version = 0
        self.optimizer_steps = 0  # the LR schedule's position (rlstack.learner.schedule), checkpointed
        self.reference_path = None if reference_path is None else Path(reference_path)
        self.transform = transform
        self.engine: Any = None
        self.critic: Any = None  # the value model's engine when cfg.critic.enabled
        self.reference: Any = None  # the frozen reference policy (KL), when reference_path is given
        self._weight_sync: Any = None  # rank 0's broadcast backend (attach_weight_sync)
        self.device = torch.device("cpu")

    # ---- set-up --------------------------------------------------------------------------------

    def node_ip(self) -> str:
        """This actor's node address (the rendezvous host when this is rank 0)."""
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"

    def free_port(self) -> int:
        return free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group, load the policy from `model_path` and build the ZeRO engine (and the
        critic's, when enabled)."""
        import deepspeed

        from rlstack.model import Step3p5ForCausalLM

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        backend = resolve_backend(self.cfg.backend, torch.cuda.is_available())
        os.environ |= {
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            # Ray gives each GPU actor exactly one visible device; on CPU the index only names the rank.
            "LOCAL_RANK": "0" if backend == "nccl" else str(self.rank),
        }
        # Without LOCAL_SIZE DeepSpeed's CPU shared-memory all-reduce stays off: it is only used for
        # inference, and it leaves files in /dev/shm that nothing removes.
        os.environ.pop("LOCAL_SIZE", None)
        if backend == "nccl":
            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        torch.set_num_threads(learner_threads(self.cfg))
        _seed_everything(self.cfg.seed + self.rank)

        if not dist.is_initialized():
            # No device_id here on purpose: see the module docstring.
            dist.init_process_group(
                backend=backend,
                init_method="env://",
                rank=self.rank,
                world_size=self.world_size,
                timeout=PROCESS_GROUP_TIMEOUT,
            )
        deepspeed.init_distributed(dist_backend=backend, timeout=PROCESS_GROUP_TIMEOUT)

        model = Step3p5ForCausalLM.from_pretrained(self.model_path, dtype=self.model_dtype)
        self.engine = self._engine(model, self.cfg.lr)
        if self.cfg.critic.enabled:
            # Loading may draw from the global RNGs; fork them so the policy's streams do not depend on
            # whether a critic exists.
            with torch.random.fork_rng(devices=[]):
                critic_path = self.cfg.critic.model_path or self.model_path
                value_model = ValueModel.from_policy(critic_path, self.cfg.critic.head_seed, self.model_dtype)
            self.critic = self._engine(value_model, self.cfg.critic_lr)
        if self.reference_path is not None:
            with torch.random.fork_rng(devices=[]):
                self.reference = frozen_reference(
                    self.reference_path, self.cfg, self.device, self.model_dtype
                )
        self._reducer = DistReducer(self.device)
        self._sink = _EngineSink(self.engine)

    def _engine(self, model: torch.nn.Module, lr: float) -> Any:
        """A ZeRO engine with its own AdamW (learning rate `lr`) over `model`, on this rank's device."""
        import deepspeed
        from deepspeed.utils import set_z3_leaf_modules

        from rlstack.model.modeling import Step3p5MoE

        model = model.to(self.device)
        if self.cfg.zero_stage == 3:
            # The MoE block indexes its packed expert weights directly (their holder modules never run
            # forward), so ZeRO-3 must gather the whole block at once.
            set_z3_leaf_modules(model, [Step3p5MoE])
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, self.cfg.weight_decay),
            config=deepspeed_config(self.cfg, lr),
        )
        return engine

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype the learner's models are held in (`learner.dtype`)."""
        return torch.bfloat16 if self.cfg.dtype == "bfloat16" else torch.float32

    def dist_info(self) -> dict[str, Any]:
        """Facts about this rank's default process group (tests check that no device is bound)."""
        pg = dist.distributed_c10d._get_default_group()
        return {
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "backend": str(dist.get_backend()),
            "bound_device_id": pg.bound_device_id,
        }

    # ---- compute -------------------------------------------------------------------------------

    @torch.no_grad()
    def compute_logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        """log pi(input_ids[t] | < t) for this rank's rows with the current weights (pi_old). (B, L),
        0 at position 0 and on padding. Collective under ZeRO-3 (every rank needs >= 1 row)."""

        def logp(ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
            scores = score_tokens(
                self.engine, ids, attn, with_entropy=False, with_routing=False, transform=self.transform
            )
            return scores.logp

        return self._score_rows(self.engine, batch, logp)

    @torch.no_grad()
    def compute_values(self, batch: PolicyBatch) -> torch.Tensor:
        """Critic values V(s_t) of this rank's rows, aligned like `compute_logprobs` (position t: the state
        token t was sampled in), plus one column: (B, L + 1). Position n_b, one past row b's last token,
        holds the value of the state AFTER its last token (the bootstrap target of a truncated response);
        0 at position 0 and past n_b. Collective under ZeRO-3."""
        if self.critic is None:
            raise ValueError(
                "compute_values needs the critic: set learner.critic.enabled: true "
                "(algorithm.advantage: critic uses it)"
            )
        return self._score_rows(
            self.critic, batch, lambda ids, attn: self.critic(ids, attn), state_after_last=True
        )

    def _score_rows(
        self, engine: Any, batch: PolicyBatch, score: Any, state_after_last: bool = False
    ) -> torch.Tensor:
        """`score(ids, attn) -> (b, l)` over micro-batches of `batch` (padded with inert ones to the
        largest count of any rank, for ZeRO-3's collectives), 0 on padding, back at length L. With
        `state_after_last` one padding column is appended first, so position n_b (scored from the hidden
        state of the last real token) is kept too: (B, L + 1)."""
        engine.eval()
        n_real = len(batch.chunks(self.cfg.micro_batch_size))
        width = batch.seq_len + int(state_after_last)
        out = []
        for i, mb in enumerate(padded_micro_batches(batch, self.cfg.micro_batch_size, self._reducer)):
            mb = mb.trim()
            ids, attn = mb.input_ids, mb.attention_mask  # (b, l)
            if state_after_last:
                ids = torch.nn.functional.pad(ids, (0, 1), value=int(ids[0, 0]))  # (b, l + 1)
                attn = torch.nn.functional.pad(attn, (0, 1))  # (b, l + 1)
                keep = torch.nn.functional.pad(attn[:, :-1], (1, 0)).bool()  # (b, l + 1): token t-1 real
            else:
                keep = attn.bool()  # (b, l)
            scores = score(ids.to(self.device), attn.to(self.device))  # (b, l')
            if i < n_real:
                scores = torch.where(keep, scores.cpu(), 0.0).float()  # (b, l')
                out.append(torch.nn.functional.pad(scores, (0, width - scores.shape[1])))
        return torch.cat(out)

    def train_step(
        self, batch: PolicyBatch | list[PolicyBatch], algo_cfg: AlgorithmConfig
    ) -> dict[str, float]:
        """One update: with a critic, first `n_minibatches` critic steps on `returns`, then (always)
        `n_minibatches` policy steps. `batch` is this rank's rows (split here into `cfg.n_minibatches`), or a
        list with this rank's rows of each global mini-batch (what `LearnerGroup` sends). Returns global
        metrics (identical on every rank; `critic/...` with a critic); bumps `version`."""
        return self.train_step_old_from_forward(batch, algo_cfg, old_from_forward=False)[0]

    def train_step_old_from_forward(
        self,
        batch: PolicyBatch | list[PolicyBatch],
        algo_cfg: AlgorithmConfig,
        old_from_forward: bool = True,
    ) -> tuple[dict[str, float], torch.Tensor | None]:
        """`train_step`, where (with `old_from_forward`) rows without `old_logp` take pi_old from the
        training forward itself instead of a separate `compute_logprobs` pass: one mini-batch only (before
        its optimizer step the weights are pi_old), stateless MIS filter. Returns (metrics, this rank's
        pi_old (B, L) or None when every row brought its own)."""
        start = time.perf_counter()
        minibatches = self._minibatches(batch)
        if old_from_forward and len(minibatches) > 1 and any(s.old_logp is None for s in minibatches):
            raise ValueError(
                f"pi_old from the training forward needs one mini-batch per step (learner.n_minibatches "
                f"= {len(minibatches)}): after the first optimizer step the weights are no longer pi_old"
            )
        metrics = self.train_critic(minibatches, algo_cfg) if self.critic is not None else {}
        old_logp: list[torch.Tensor] = []
        metrics |= self._train_policy(minibatches, algo_cfg, old_from_forward, old_logp)
        self.version += 1
        self.optimizer_steps += len(minibatches)
        metrics |= {
            "learner/version": float(self.version),
            "learner/step_time_s": time.perf_counter() - start,
        }
        return metrics, torch.cat(old_logp) if old_logp else None

    def _minibatches(self, batch: PolicyBatch | list[PolicyBatch]) -> list[PolicyBatch]:
        minibatches = (
            batch if isinstance(batch, list) else list(iter_minibatches(batch, self.cfg.n_minibatches))
        )
        for shard in minibatches:
            check_critic_inputs(shard, enabled=self.cfg.critic.enabled)
        return minibatches

    def train_policy(
        self, batch: PolicyBatch | list[PolicyBatch], algo_cfg: AlgorithmConfig
    ) -> dict[str, float]:
        """The policy's optimizer steps of `train_step` (one per mini-batch); `actor/...` metrics. Does not
        bump `version` (train_step does)."""
        return self._train_policy(self._minibatches(batch), algo_cfg)

    def _train_policy(
        self,
        minibatches: list[PolicyBatch],
        algo_cfg: AlgorithmConfig,
        old_from_forward: bool = False,
        old_logp_out: list[torch.Tensor] | None = None,
    ) -> dict[str, float]:
        def accumulate(shard: PolicyBatch) -> MetricSums:
            return accumulate_minibatch(
                self.engine,
                shard,
                algo_cfg,
                self._sink,
                self._reducer,
                self.cfg.micro_batch_size,
                self.device,
                old_from_forward,
                old_logp_out,
                ref_model=self.reference,
                transform=self.transform,
            )

        return self._optimize(
            self.engine, minibatches, accumulate, (*SUMMED, *COUNTED), "actor", self._has_signal
        )

    def _has_signal(self, stats: MetricSums) -> bool:
        """Whether any rank's mini-batch, after its forward, has a token that can move the weights: in the
        training mask (loss mask, MIS masks, finite log-probs) with a nonzero advantage, or any such token
        when the KL term is on (`actor/signal_tokens`). Collective."""
        local = stats.sums.get("actor/signal_tokens", 0.0)
        return bool(self._reducer.sum_(torch.tensor([local], dtype=torch.float64)).item() > 0)

    def train_critic(
        self, batch: PolicyBatch | list[PolicyBatch], algo_cfg: AlgorithmConfig
    ) -> dict[str, float]:
        """The critic's optimizer steps of `train_step`: masked MSE of V(s_t) against `batch.returns`,
        normalised like the policy loss (`algorithm.loss_norm`, global over ranks); `critic/...` metrics."""
        if self.critic is None:
            raise ValueError("train_critic needs the critic: set learner.critic.enabled: true")
        minibatches = self._minibatches(batch)
        sink = _EngineSink(self.critic)

        def accumulate(shard: PolicyBatch) -> MetricSums:
            mbs, norm = self.cfg.micro_batch_size, algo_cfg.loss_norm
            return accumulate_critic_minibatch(
                self.critic, shard, norm, sink, self._reducer, mbs, self.device
            )

        metrics = self._optimize(self.critic, minibatches, accumulate, CRITIC_SUMMED, "critic")
        return finish_critic_metrics(metrics)

    def _optimize(
        self,
        engine: Any,
        minibatches: list[PolicyBatch],
        accumulate: Any,
        summed: tuple[str, ...],
        prefix: str,
        has_signal: Any = None,
    ) -> dict[str, float]:
        """One optimizer step of `engine` per mini-batch (`accumulate(shard) -> MetricSums` fills the
        gradients); global metrics with the mean of the mini-batch losses, grad norm and lr.

        The learning rate of each step comes from the schedule (`schedule.lr_at`, by optimizer step). A
        mini-batch without learning signal (`has_signal(stats)` False after its forward: no trained token
        with a nonzero advantage and no KL term, so the gradient is exactly 0) steps with learning rate 0.
        Adam would otherwise still move every weight by its momentum, and a run of zero-reward batches
        (sparse rewards) drifts the policy with no signal."""
        engine.train()
        total = MetricSums()
        grad_norms, lrs = [], []
        frozen = 0
        base_lr = self.cfg.lr if engine is self.engine else self.cfg.critic_lr
        for i, shard in enumerate(minibatches):
            stats = accumulate(shard)
            freeze = has_signal is not None and not has_signal(stats)
            lr = lr_at(self.optimizer_steps + i, base_lr, self.cfg)
            lrs.append(lr)
            pre_norm = _grad_norm(engine) if self.cfg.zero_stage == 0 else None
            _set_lr(engine.optimizer, 0.0 if freeze else lr)
            engine.step()
            frozen += freeze
            norm = engine.get_global_grad_norm()
            grad_norms.append(float(norm if norm is not None else pre_norm))
            total.merge(stats)
        metrics = total.all_reduce(self._reducer).result()
        for k in summed:  # mean of the mini-batch losses
            if k in metrics and k not in COUNTED:
                metrics[k] /= len(minibatches)
        metrics |= {
            f"{prefix}/grad_norm": sum(grad_norms) / len(grad_norms),
            f"{prefix}/lr": sum(lrs) / len(lrs),
        }
        if has_signal is not None:
            metrics[f"{prefix}/frozen_steps"] = float(frozen)
        return metrics

    def get_version(self) -> int:
        return self.version

    # ---- weights and checkpoints ---------------------------------------------------------------

    @torch.no_grad()
    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """The policy's full fp32 state dict (parameters and persistent buffers such as `router_bias`) under
        the HF / vLLM checkpoint names, on rank 0 (None elsewhere). Never the critic. Collective under
        ZeRO-3."""
        return self._full_state(self.engine)

    @torch.no_grad()
    def critic_weights(self) -> dict[str, torch.Tensor] | None:
        """The critic's full fp32 state dict (`model.*` trunk, `value_head.*`) on rank 0, None elsewhere.
        Collective under ZeRO-3."""
        if self.critic is None:
            raise ValueError("critic_weights: learner.critic.enabled is false, there is no critic")
        return self._full_state(self.critic)

    def _full_state(self, engine: Any, on_device: bool = False) -> dict[str, torch.Tensor] | None:
        """The engine's full fp32 state dict on rank 0 (None elsewhere): copies on the CPU, or on this
        rank's device with `on_device`. Collective under ZeRO-3."""
        module = engine.module

        def _export(t: torch.Tensor) -> torch.Tensor:
            return _copy_out(t, on_device)

        if self.cfg.zero_stage != 3:
            if self.rank != 0:
                return None
            return {k: _export(v) for k, v in module.state_dict().items()}
        import deepspeed

        gathered: dict[str, torch.Tensor] = {}
        for prefix, mod in module.named_modules():
            named = list(mod.named_parameters(prefix=prefix, recurse=False))
            if not named:
                continue
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                if self.rank == 0:
                    gathered |= {name: _export(p) for name, p in named}
        if self.rank != 0:
            return None
        # state_dict order and names; parameters come from the gather, buffers are never partitioned
        return {k: gathered[k] if k in gathered else _export(v) for k, v in module.state_dict().items()}

    def weight_broadcast_check(self) -> float:
        """Broadcast rank 0's exported weights to every rank over a process group created now, after
        training (the shape of an NCCL weight-sync group); return a checksum of what this rank holds.
        Completes promptly unless process-group set-up is broken (the DeepSpeed >= 0.17.3 device_id hang)."""
        weights = self.export_weights()
        group = dist.new_group(ranks=list(range(self.world_size)))
        try:
            meta = [None if weights is None else [(k, tuple(v.shape)) for k, v in weights.items()]]
            dist.broadcast_object_list(meta, src=0, group=group)
            total = 0.0
            for name, shape in meta[0]:  # type: ignore[union-attr]
                t = weights[name] if weights is not None else torch.empty(shape, dtype=torch.float32)
                t = t.to(self.device)
                dist.broadcast(t, src=0, group=group)
                total += float(t.double().sum())
            dist.barrier(group=group)
            return total
        finally:
            dist.destroy_process_group(group)

    def attach_weight_sync(self, backend: Any) -> None:
        """Keep `backend` (a broadcast `WeightSyncBackend` from `RolloutGroup.weight_sync`, picklable) on
        rank 0 for `push_weights`; other ranks ignore it. Closes a backend attached before (its process
        group with the engines), so `attach_weight_sync(None)` detaches; best effort, since the engines
        may be gone already (their side of the group went with them)."""
        previous = self._weight_sync
        self._weight_sync = backend if self.rank == 0 else None
        if previous is not None and previous is not backend:
            with contextlib.suppress(Exception):
                previous.close()

    @torch.no_grad()
    def push_weights(self, version: int) -> dict[str, float]:
        """Push the policy's weights from rank 0 straight into the rollout engines through the attached
        backend (`backend.push(state, version)`); returns its metrics on rank 0, {} elsewhere. Collective
        (call it on every rank: under ZeRO-3 the gather in `export_weights` is)."""
        # before any check: the other ranks are in the gather too. On GPU the tensors stay on the GPU, from
        # which the NCCL broadcast sends them (no round trip through host memory).
        state = self._full_state(self.engine, on_device=True)
        if self.rank != 0:
            return {}
        if self._weight_sync is None:
            raise RuntimeError("push_weights before attach_weight_sync: no weight-sync backend on rank 0")
        assert state is not None
        return self._weight_sync.push(state, version)

    def save_checkpoint(self, path: str) -> None:
        """`path/`: HF-format policy (config, safetensors, tokenizer files copied from the source
        checkpoint) that vLLM loads; `path/trainer_state/`: DeepSpeed optimizer + engine state (`deepspeed/`,
        and the critic's whole engine in `critic/`), per-rank RNG states and `learner.json` (version, world
        size, ZeRO stage, critic). Collective."""
        root = Path(path)
        state = root / "trainer_state"
        state.mkdir(parents=True, exist_ok=True)
        weights = self.export_weights()
        tag = f"version_{self.version}"
        self.engine.save_checkpoint(
            str(state / "deepspeed"), tag=tag, client_state=self._client_state(), save_latest=True
        )
        if self.critic is not None:
            self.critic.save_checkpoint(
                str(state / "critic"), tag=tag, client_state=self._client_state(), save_latest=True
            )
        torch.save(_rng_state(), state / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            assert weights is not None
            self.engine.module.save_pretrained(root, state_dict=weights)
            _copy_tokenizer_files(self.model_path, root)
            meta = {
                "version": self.version,
                "tag": tag,
                "world_size": self.world_size,
                "zero_stage": self.cfg.zero_stage,
                "critic": self.critic is not None,
            }
            (state / "learner.json").write_text(json.dumps(meta, indent=2) + "\n")
        dist.barrier()

    def load_checkpoint(self, path: str) -> int:
        """Restore weights, optimizer state, RNG states and version from `save_checkpoint(path)` output
        (same number of ranks and ZeRO stage). Collective. Returns the restored version."""
        state = Path(path) / "trainer_state"
        meta_file = state / "learner.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file}: not a learner checkpoint (written by save_checkpoint)")
        meta = json.loads(meta_file.read_text())
        if (meta["world_size"], meta["zero_stage"]) != (self.world_size, self.cfg.zero_stage):
            raise ValueError(
                f"{meta_file}: saved with {meta['world_size']} ranks and ZeRO-{meta['zero_stage']}, but this "
                f"learner has {self.world_size} ranks and ZeRO-{self.cfg.zero_stage}; resume with the same "
                "learner.num_ranks and learner.zero_stage (or start from the HF weights in that directory)"
            )
        saved_critic = bool(meta.get("critic", False))  # checkpoints from before the critic have none
        if saved_critic != self.cfg.critic.enabled:
            had, has = ("a", "no") if saved_critic else ("no", "a")
            raise ValueError(
                f"{meta_file}: saved with {had} critic, but this learner has {has} critic "
                f"(learner.critic.enabled = {self.cfg.critic.enabled}); resume with the setting it was saved "
                "with (or start from the HF weights in that directory)"
            )
        client = self._load_engine(self.engine, state / "deepspeed", meta["tag"])
        if self.critic is not None:
            self._load_engine(self.critic, state / "critic", meta["tag"])
        self.version = int(client["version"])
        # checkpoints from before the LR schedule: one optimizer step per version was all there was
        self.optimizer_steps = int(client.get("optimizer_steps", self.version * self.cfg.n_minibatches))
        _set_rng_state(torch.load(state / f"rng_rank{self.rank}.pt", weights_only=False))
        dist.barrier()
        return self.version

    def _client_state(self) -> dict[str, int]:
        return {"version": self.version, "optimizer_steps": self.optimizer_steps}

    @staticmethod
    def _load_engine(engine: Any, ds_dir: Path, tag: str) -> dict[str, Any]:
        loaded, client = engine.load_checkpoint(
            str(ds_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise FileNotFoundError(f"{ds_dir}: DeepSpeed found no checkpoint with tag {tag}")
        return client

    def reference_numel(self) -> dict[str, int]:
        """Elements of the KL reference on this rank and in the whole model (see `reference.shard_numel`)."""
        if self.reference is None:
            raise ValueError("reference_numel: this learner has no reference policy (reference_path unset)")
        return shard_numel(self.reference)

    def optimizer_state(self, critic: bool = False) -> dict[str, torch.Tensor]:
        """This rank's optimizer state tensors (the critic's with `critic`), flattened in a fixed order
        (tests compare them)."""
        opt = (self.critic if critic else self.engine).optimizer
        base = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer
        out: dict[str, torch.Tensor] = {}
        # ZeRO-3 empties param_groups between steps, so walk the state itself (insertion order is stable)
        for i, state in enumerate(base.state.values()):
            for key, value in sorted(state.items()):
                if isinstance(value, torch.Tensor):
                    out[f"{i}.{key}"] = value.detach().cpu().clone()
        return out

    def shutdown(self) -> None:
        """Leave the process group (so the actor can exit cleanly)."""
        self.attach_weight_sync(None)
        self.engine = self.critic = None
        if dist.is_initialized():
            dist.destroy_process_group()


def _grad_norm(engine: Any) -> float:
    """Global 2-norm of the (already all-reduced) gradients; ZeRO-0 does not record it."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def _set_lr(optimizer: Any, lr: float) -> None:
    """The learning rate of the next optimizer step. At 0 AdamW changes no weight (its update and its
    decoupled decay both scale with lr), which is how a step without learning signal runs."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def _copy_out(t: torch.Tensor, on_device: bool = False) -> torch.Tensor:
    """A detached fp32 (if floating) copy of `t`, contiguous, on the CPU or (`on_device`) where `t` is."""
    t = t.detach()
    t = t.float() if t.is_floating_point() else t
    return (t if on_device else t.cpu()).clone().contiguous()


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    for f in src.iterdir():
        if f.is_file() and f.name not in _WEIGHT_FILES and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, dst / f.name)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
