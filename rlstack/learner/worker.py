"""`LearnerWorker`: one data-parallel rank of the policy learner (a DeepSpeed engine), run as a Ray actor.

`LearnerGroup` wraps this class with `ray.remote`; it is a plain class, so one rank can also run in-process.
Lifecycle: `__init__` (cheap) -> `setup(master_addr, master_port)` on every rank at once (process group,
model, ZeRO engine) -> `compute_logprobs` / `train` / `export_weights` / `save_checkpoint` -> `shutdown`.
Every method that touches parameters is collective under ZeRO-3: call it on all ranks.

This class holds the rank's state and composes the jobs, each in its own module: `engine` (process group,
DeepSpeed config and engines), `scoring` (log-probs and values over padded micro-batches), `train` (the
optimizer steps, LR schedule, no-signal rule, the batch check), `export` (full-state gather), `checkpoint`
(save/load, RNG) and `reference` (the frozen KL reference).

With `learner.critic.enabled` the rank holds a second engine, the critic (`critic.ValueModel`): same ZeRO
stage and process group, its own AdamW. `compute_values` scores with it, `train` takes a critic step
before the policy step, checkpoints carry its full state; `export_weights` stays the policy only.
One DeepSpeed process group per process: build one worker per process (DeepSpeed caches its groups).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlstack.learner import checkpoint
from rlstack.learner.batch import PolicyBatch
from rlstack.learner.config import LearnerConfig
from rlstack.learner.critic import (
    CRITIC_SUMMED,
    ValueModel,
    accumulate_critic_minibatch,
    check_critic_inputs,
    finish_critic_metrics,
)
from rlstack.learner.engine import (
    EngineSink,
    build_engine,
    deepspeed_config,
    free_port,
    init_process_group,
    model_dtype,
    param_groups,
    resolve_backend,
)
from rlstack.learner.export import broadcast_checksum, full_state
from rlstack.learner.logprobs import (
    SamplingTransform,
    score_tokens,
    set_logprob_chunk_tokens,
    set_pack_sequences,
)
from rlstack.learner.lora import (
    adapter_state,
    apply_lora,
    is_lora,
    lora_scaling,
    merged_state,
    plain_name,
    save_adapter,
)
from rlstack.learner.moe import update_router_bias
from rlstack.learner.reference import frozen_reference, shard_numel
from rlstack.learner.scoring import Score, score_rows
from rlstack.learner.step import (
    COUNTED,
    SUMMED,
    DistReducer,
    MetricSums,
    accumulate_minibatch,
    iter_minibatches,
    padded_micro_batches,
)
from rlstack.learner.train import TrainResult, optimize
from rlstack.mispo import AlgorithmConfig
from rlstack.model.auto import base_model, checkpoint_state, load_causal_lm, moe_layer_ids
from rlstack.perf import measure_peak_flops

# Set-up helpers that tests and scripts import from here.
__all__ = ["LearnerWorker", "deepspeed_config", "free_port", "param_groups", "resolve_backend"]


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

    # ---- set-up (rlstack.learner.engine) ---------------------------------------------------------

    def node_ip(self) -> str:
        """This actor's node address (the rendezvous host when this is rank 0)."""
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"

    def info(self) -> dict[str, Any]:
        """Who this rank is: pid, Ray node id, host and node address (placement records, error messages)."""
        import socket

        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return {"pid": os.getpid(), "node": node, "host": socket.gethostname(), "ip": self.node_ip()}

    def free_port(self) -> int:
        return free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group, load the policy from `model_path` and build the ZeRO engine (and the
        critic's, when enabled; the frozen reference, when given)."""
        self.device = init_process_group(self.cfg, self.rank, self.world_size, master_addr, master_port)
        self.engine = build_engine(self._load_policy(), self.cfg, self.cfg.lr, self.device)
        if self.cfg.critic.enabled:
            # Loading may draw from the global RNGs; fork them so the policy's streams do not depend on
            # whether a critic exists.
            with torch.random.fork_rng(devices=[]):
                critic_path = self.cfg.critic.model_path or self.model_path
                value_model = ValueModel.from_policy(critic_path, self.cfg.critic.head_seed, self.model_dtype)
            self.critic = build_engine(value_model, self.cfg, self.cfg.critic_lr, self.device)
        if self.reference_path is not None:
            with torch.random.fork_rng(devices=[]):
                self.reference = frozen_reference(
                    self.reference_path, self.cfg, self.device, self.model_dtype
                )
        self._reducer = DistReducer(self.device)
        self._sink = EngineSink(self.engine)
        set_logprob_chunk_tokens(self.cfg.logprob_chunk_tokens)  # every score_tokens of this process
        set_pack_sequences(self.cfg.pack_sequences)
        # this rank's matmul peak with its own threads and dtype: the denominator of perf/mfu
        self._peak_flops = measure_peak_flops(
            self.model_dtype, torch.get_num_threads(), seconds=0.5, device=self.device
        )

    def peak_flops(self) -> float:
        """Measured matmul FLOP/s of this rank (rlstack.perf.measure_peak_flops, at setup)."""
        return self._peak_flops

    def _load_policy(self) -> Any:
        """The policy checkpoint as transformers' class for its architecture, with activation checkpointing
        and LoRA adapters when configured."""
        model = load_causal_lm(self.model_path, self.model_dtype)
        self._side_files = checkpoint.side_files_of(self.model_path)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.cfg.lora is not None:
            model = apply_lora(model, self.cfg.lora)
        return model

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype the learner's models are held in (`learner.dtype`)."""
        return model_dtype(self.cfg)

    def dist_info(self) -> dict[str, Any]:
        """Facts about this rank's default process group (tests check that no device is bound)."""
        pg = dist.distributed_c10d._get_default_group()
        return {
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "backend": str(dist.get_backend()),
            "bound_device_id": pg.bound_device_id,
        }

    # ---- scoring (rlstack.learner.scoring) -------------------------------------------------------

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
        self, engine: Any, batch: PolicyBatch, score: Score, state_after_last: bool = False
    ) -> torch.Tensor:
        split = self.cfg.micro_split
        return score_rows(engine, batch, score, split, self._reducer, self.device, state_after_last)

    # ---- training (rlstack.learner.train) --------------------------------------------------------

    def train(
        self,
        batch: PolicyBatch | list[PolicyBatch],
        algo_cfg: AlgorithmConfig,
        old_logp_from_forward: bool = False,
    ) -> TrainResult:
        """One update: with a critic, first `n_minibatches` critic steps on `returns`, then (always)
        `n_minibatches` policy steps; bumps `version`. `batch` is this rank's rows (split here into
        `cfg.n_minibatches`), or a list with this rank's rows of each global mini-batch (what
        `LearnerGroup` sends). With `old_logp_from_forward`, rows without `old_logp` take pi_old from the
        training forward itself instead of a separate `compute_logprobs` pass: one mini-batch only (before
        its optimizer step the weights are pi_old), stateless MIS filter. Returns global metrics (identical
        on every rank; `critic/...` with a critic) and this rank's pi_old (B, L) when it came from the
        forward (None when every row brought its own)."""
        start = time.perf_counter()
        minibatches = self._minibatches(batch)
        if old_logp_from_forward and len(minibatches) > 1 and any(s.old_logp is None for s in minibatches):
            raise ValueError(
                f"pi_old from the training forward needs one mini-batch per step (learner.n_minibatches "
                f"= {len(minibatches)}): after the first optimizer step the weights are no longer pi_old"
            )
        metrics = self.train_critic(minibatches, algo_cfg) if self.critic is not None else {}
        old_logp: list[torch.Tensor] = []
        metrics |= self._train_policy(minibatches, algo_cfg, old_logp_from_forward, old_logp)
        self.version += 1
        self.optimizer_steps += len(minibatches)
        metrics |= {
            "learner/version": float(self.version),
            "learner/step_time_s": time.perf_counter() - start,
        }
        return TrainResult(metrics, torch.cat(old_logp) if old_logp else None)

    def train_step(
        self, batch: PolicyBatch | list[PolicyBatch], algo_cfg: AlgorithmConfig
    ) -> dict[str, float]:
        """`train` with pi_old in the batch; its metrics."""
        return self.train(batch, algo_cfg).metrics

    def train_step_old_from_forward(
        self,
        batch: PolicyBatch | list[PolicyBatch],
        algo_cfg: AlgorithmConfig,
        old_from_forward: bool = True,
    ) -> tuple[dict[str, float], torch.Tensor | None]:
        """`train(batch, algo_cfg, old_from_forward)` as (metrics, this rank's pi_old or None)."""
        result = self.train(batch, algo_cfg, old_from_forward)
        return result.metrics, result.old_logp

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
        """The policy's optimizer steps of `train` (one per mini-batch); `actor/...` metrics. Does not
        bump `version` (train does)."""
        return self._train_policy(self._minibatches(batch), algo_cfg)

    def _train_policy(
        self,
        minibatches: list[PolicyBatch],
        algo_cfg: AlgorithmConfig,
        old_from_forward: bool = False,
        old_logp_out: list[torch.Tensor] | None = None,
    ) -> dict[str, float]:
        moe = self.cfg.moe
        probe = moe.probe_every > 0 and self.version % moe.probe_every == 0
        minibatches = self._with_replay(minibatches, old_from_forward)

        def accumulate(shard: PolicyBatch) -> MetricSums:
            return accumulate_minibatch(
                self.engine,
                shard,
                algo_cfg,
                self._sink,
                self._reducer,
                self.cfg.micro_split,
                self.device,
                old_from_forward,
                old_logp_out,
                ref_model=self.reference,
                transform=self.transform,
                moe=moe,
                probe=probe,
                skip_zero_signal=self.cfg.skip_zero_signal,
            )

        def update_bias(stats: MetricSums) -> None:
            if moe.bias_update_rate > 0.0 and "moe/expert_tokens" in stats.arrays:
                load = self._reducer.sum_(stats.arrays["moe/expert_tokens"].clone())  # (L, E), all ranks
                update_router_bias(self.engine.module, load, moe.bias_update_rate)

        return optimize(
            self.engine,
            minibatches,
            accumulate,
            cfg=self.cfg,
            base_lr=self.cfg.lr,
            first_step=self.optimizer_steps,
            reducer=self._reducer,
            summed=(*SUMMED, *COUNTED),
            prefix="actor",
            has_signal=self._has_signal,
            after_step=update_bias,
            moe_layer_ids=moe_layer_ids(self.engine.module),
        )

    def _with_replay(self, minibatches: list[PolicyBatch], old_from_forward: bool) -> list[PolicyBatch]:
        """The mini-batches with the experts their training forward replays (`learner.routing_replay`)."""
        mode = self.cfg.routing_replay
        if mode == "off":
            return minibatches
        if mode == "rollout":
            for shard in minibatches:
                if shard.rollout_experts is None:
                    raise ValueError(
                        "learner.routing_replay = 'rollout' but the rollouts carry no routed experts: the "
                        "policy has no MoE layers, or the rollout engines did not record routing "
                        "(RolloutGroup(record_routing=True); the driver sets it for this setting)"
                    )
            return [shard.replace(replay_experts=shard.rollout_experts) for shard in minibatches]
        if old_from_forward:
            return minibatches  # the training forward IS pi_old's forward: its routing is pi_old's (R2)
        return [shard.replace(replay_experts=self._routing_of(shard)) for shard in minibatches]

    @torch.no_grad()
    def _routing_of(self, shard: PolicyBatch) -> torch.Tensor:
        """(B, L, n_moe, k) int16: the experts the current weights (pi_old, before this step's first update)
        route each of the shard's tokens to; -1 on padding. Collective under ZeRO-3."""

        def ids(input_ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
            scores = score_tokens(self.engine, input_ids, attn, with_entropy=False, transform=self.transform)
            if scores.expert_ids is None:
                raise ValueError("learner.routing_replay = 'old' needs a MoE policy with routing statistics")
            return torch.where(attn.bool()[..., None, None], scores.expert_ids, -1).to(torch.int16)

        out: torch.Tensor | None = None  # (B, L, layers, k) in the shard's row order
        # every rank runs as many forwards as the busiest one (ZeRO-3 gathers inside each forward)
        for m in padded_micro_batches(shard, self.cfg.micro_split, self._reducer):
            routes = ids(m.batch.input_ids.to(self.device), m.batch.attention_mask.to(self.device)).cpu()
            if not m.pad:
                if out is None:
                    out = torch.full((len(shard), *routes.shape[1:]), -1, dtype=routes.dtype)
                out[m.rows] = routes
        assert out is not None, "a learner rank got no rows"
        return out

    def _has_signal(self, stats: MetricSums) -> bool:
        """Whether any rank's mini-batch, after its forward, has a token that can move the weights: in the
        training mask (loss mask, MIS masks, finite log-probs) with a nonzero advantage, or any such token
        when the KL term is on (`actor/signal_tokens`). Collective."""
        local = stats.sums.get("actor/signal_tokens", 0.0)
        return bool(self._reducer.sum_(torch.tensor([local], dtype=torch.float64)).item() > 0)

    def train_critic(
        self, batch: PolicyBatch | list[PolicyBatch], algo_cfg: AlgorithmConfig
    ) -> dict[str, float]:
        """The critic's optimizer steps of `train`: masked MSE of V(s_t) against `batch.returns`,
        normalised like the policy loss (`algorithm.loss_norm`, global over ranks); `critic/...` metrics."""
        if self.critic is None:
            raise ValueError("train_critic needs the critic: set learner.critic.enabled: true")
        minibatches = self._minibatches(batch)
        sink = EngineSink(self.critic)

        def accumulate(shard: PolicyBatch) -> MetricSums:
            mbs, norm = self.cfg.micro_split, algo_cfg.loss_norm
            return accumulate_critic_minibatch(
                self.critic, shard, norm, sink, self._reducer, mbs, self.device
            )

        metrics = optimize(
            self.critic,
            minibatches,
            accumulate,
            cfg=self.cfg,
            base_lr=self.cfg.critic_lr,
            first_step=self.optimizer_steps,
            reducer=self._reducer,
            summed=CRITIC_SUMMED,
            prefix="critic",
        )
        return finish_critic_metrics(metrics)

    def get_version(self) -> int:
        return self.version

    # ---- weights (rlstack.learner.export) --------------------------------------------------------

    @torch.no_grad()
    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """The policy's full fp32 state dict (parameters and persistent buffers such as `router_bias`) under
        the HF / vLLM checkpoint names, LoRA adapters merged, on rank 0 (None elsewhere). Never the critic.
        Collective under ZeRO-3."""
        return self._exported_state()

    def _exported_state(self, on_device: bool = False) -> dict[str, torch.Tensor] | None:
        """The policy's full state as the engines load it: LoRA merged, checkpoint names (rank 0; None
        elsewhere). Collective under ZeRO-3."""
        return self._checkpoint_named(self._policy_state(self._full_state(self.engine, on_device)))

    def _policy_state(self, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """A full state of the policy engine under the plain model's names (LoRA merged, no PEFT prefix)."""
        if state is None or not is_lora(self.engine.module):
            return state
        return merged_state(state, lora_scaling(self.engine.module))

    def _checkpoint_named(self, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """The plain model's state under the checkpoint's tensor names (what vLLM's load_weights takes)."""
        return None if state is None else checkpoint_state(base_model(self.engine.module), state)

    @torch.no_grad()
    def critic_weights(self) -> dict[str, torch.Tensor] | None:
        """The critic's full fp32 state dict (`model.*` trunk, `value_head.*`) on rank 0, None elsewhere.
        Collective under ZeRO-3."""
        if self.critic is None:
            raise ValueError("critic_weights: learner.critic.enabled is false, there is no critic")
        return self._full_state(self.critic)

    def _full_state(self, engine: Any, on_device: bool = False) -> dict[str, torch.Tensor] | None:
        """`export.full_state` of `engine` on this rank (tests call it for the on-device copies)."""
        return full_state(engine, self.cfg.zero_stage, self.rank, on_device)

    def weight_broadcast_check(self) -> float:
        """Broadcast rank 0's exported weights to every rank over a process group created now, after
        training (the shape of an NCCL weight-sync group); return a checksum of what this rank holds.
        Completes promptly unless process-group set-up is broken (the DeepSpeed >= 0.17.3 device_id hang)."""
        return broadcast_checksum(self.export_weights(), self.world_size, self.device)

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
        state = self._exported_state(on_device=True)
        if self.rank != 0:
            return {}
        if self._weight_sync is None:
            raise RuntimeError("push_weights before attach_weight_sync: no weight-sync backend on rank 0")
        assert state is not None
        return self._weight_sync.push(state, version)

    # ---- checkpoints (rlstack.learner.checkpoint) -------------------------------------------------

    def save_checkpoint(self, path: str) -> None:
        """`path/`: HF-format policy (config, safetensors, tokenizer files copied from the source
        checkpoint; LoRA merged) that vLLM loads, and with LoRA the adapter alone in `path/adapter/`;
        `path/trainer_state/`: DeepSpeed optimizer + engine state (`deepspeed/`, and the critic's whole engine
        in `critic/`), per-rank RNG states and `learner.json` (version, world size, ZeRO stage, critic).
        Collective."""
        module = self.engine.module
        state = self._full_state(self.engine)
        adapter = None
        if state is not None and is_lora(module):
            adapter = functools.partial(save_adapter, module, state)
        checkpoint.save(
            path,
            engine=self.engine,
            critic=self.critic,
            policy=base_model(module),
            weights=self._policy_state(state),
            write_extra=adapter,
            counters=checkpoint.Counters(self.version, self.optimizer_steps),
            rank=self.rank,
            world_size=self.world_size,
            zero_stage=self.cfg.zero_stage,
            side_files=self._side_files,
        )

    def load_checkpoint(self, path: str) -> int:
        """Restore weights, optimizer state, RNG states and version from `save_checkpoint(path)` output
        (same number of ranks and ZeRO stage). Collective. Returns the restored version."""
        counters = checkpoint.load(
            path,
            engine=self.engine,
            critic=self.critic,
            critic_enabled=self.cfg.critic.enabled,
            rank=self.rank,
            world_size=self.world_size,
            zero_stage=self.cfg.zero_stage,
            n_minibatches=self.cfg.n_minibatches,
        )
        self.version, self.optimizer_steps = counters.version, counters.optimizer_steps
        return self.version

    # ---- test helpers ----------------------------------------------------------------------------

    def reference_numel(self) -> dict[str, int]:
        """Elements of the KL reference on this rank and in the whole model (see `reference.shard_numel`)."""
        if self.reference is None:
            raise ValueError("reference_numel: this learner has no reference policy (reference_path unset)")
        return shard_numel(self.reference)

    def policy_facts(self) -> dict[str, Any]:
        """How this rank holds the policy: parameter dtypes, ZeRO's master weights' and the optimizer states'
        dtypes (after a step), elements held here and in the whole model (`reference.shard_numel`), whether
        activation checkpointing is on."""
        module = self.engine.module
        opt = self.engine.optimizer
        base = getattr(opt, "optimizer", opt)
        states = [v for state in base.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        # ZeRO-3 and ZeRO-1/2 keep this rank's fp32 master weights under different names
        masters = getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(
            opt, "single_partition_of_fp32_groups", []
        )
        return {
            "dtypes": sorted({str(p.dtype) for p in module.parameters()}),
            "master_dtypes": sorted({str(t.dtype) for t in masters}),
            "optimizer_dtypes": sorted({str(t.dtype) for t in states if t.numel() > 1}),
            "checkpointing": bool(getattr(base_model(module), "is_gradient_checkpointing", False)),
            **shard_numel(module),
        }

    def lora_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """With LoRA: (the frozen base parameters under the plain model's names, the adapter tensors), full
        copies on rank 0 (empty elsewhere). Collective under ZeRO-3."""
        state = self._full_state(self.engine) or {}
        frozen_names = {n for n, p in self.engine.module.named_parameters() if not p.requires_grad}
        frozen = {plain_name(k): v for k, v in state.items() if k in frozen_names}
        return frozen, adapter_state(state)

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
