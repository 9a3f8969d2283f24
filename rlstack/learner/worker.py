"""`LearnerWorker`: one data-parallel rank of the policy learner (a DeepSpeed engine), run as a Ray actor.

`LearnerGroup` wraps this class with `ray.remote`; it is a plain class, so one rank can also run in-process.
Lifecycle: `__init__` (cheap) -> `setup(master_addr, master_port)` on every rank at once (process group,
model, ZeRO engine) -> `compute_logprobs` / `train_step` / `export_weights` / `save_checkpoint` ->
`shutdown`. Every method that touches parameters is collective under ZeRO-3: call it on all ranks.

Process group: we create it ourselves with `torch.distributed.init_process_group` WITHOUT `device_id`
and only then call `deepspeed.init_distributed`, which adopts it. DeepSpeed >= 0.17.3 binds `device_id`
on CUDA, which has been reported to hang the weight sync that follows the first training step when
other process groups are created later (allenai/open-instruct#1311, deepspeedai/DeepSpeed#7266, #7542).
"""

from __future__ import annotations

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
from rlstack.learner.logprobs import score_tokens
from rlstack.learner.step import (
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


def deepspeed_config(cfg: LearnerConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg`. Accumulation is driven by the caller (boundaries set per
    micro-batch, `scale_wrt_gas=False`), so DeepSpeed's own accumulation count stays 1."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2):
        # DeepSpeed's default buckets are 5e8 elements (2 GB of fp32 staging per rank): far more than we need.
        zero |= {"reduce_bucket_size": int(2e7), "allgather_bucket_size": int(2e7)}
    if cfg.zero_stage == 3:
        zero |= {"reduce_bucket_size": int(2e7), "stage3_prefetch_bucket_size": int(2e7)}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
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
    ) -> None:
        os.environ.update(env or {})
        self.model_path = Path(model_path)
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.version = 0
        self.engine: Any = None
        self.device = torch.device("cpu")

    # ---- set-up --------------------------------------------------------------------------------

    def node_ip(self) -> str:
        """This actor's node address (the rendezvous host when this is rank 0)."""
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"

    def free_port(self) -> int:
        return free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group, load the policy from `model_path` and build the ZeRO engine."""
        import deepspeed
        from deepspeed.utils import set_z3_leaf_modules

        from rlstack.model import Step3p5ForCausalLM
        from rlstack.model.modeling import Step3p5MoE

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
        torch.set_num_threads(max(1, math.floor(self.cfg.cpus_per_rank)))
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

        model = Step3p5ForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).to(self.device)
        if self.cfg.zero_stage == 3:
            # The MoE block indexes its packed expert weights directly (their holder modules never run
            # forward), so ZeRO-3 must gather the whole block at once.
            set_z3_leaf_modules(model, [Step3p5MoE])
        self.engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, self.cfg.weight_decay),
            config=deepspeed_config(self.cfg),
        )
        self._reducer = DistReducer(self.device)
        self._sink = _EngineSink(self.engine)

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
        self.engine.eval()
        n_real = len(batch.chunks(self.cfg.micro_batch_size))
        out = []
        for i, mb in enumerate(padded_micro_batches(batch, self.cfg.micro_batch_size, self._reducer)):
            mb = mb.trim()
            ids, attn = mb.input_ids.to(self.device), mb.attention_mask.to(self.device)
            logp = score_tokens(self.engine, ids, attn, with_entropy=False, with_routing=False).logp
            if i < n_real:
                logp = torch.where(attn.bool(), logp, 0.0).float().cpu()  # (b, l)
                out.append(torch.nn.functional.pad(logp, (0, batch.seq_len - logp.shape[1])))
        return torch.cat(out)

    def train_step(
        self, batch: PolicyBatch | list[PolicyBatch], algo_cfg: AlgorithmConfig
    ) -> dict[str, float]:
        """One policy update: `n_minibatches` optimizer steps. `batch` is this rank's rows (split here into
        `cfg.n_minibatches`), or a list with this rank's rows of each global mini-batch (what
        `LearnerGroup` sends). Returns global metrics (identical on every rank); bumps `version`."""
        start = time.perf_counter()
        if isinstance(batch, list):
            minibatches = batch
        else:
            minibatches = list(iter_minibatches(batch, self.cfg.n_minibatches))
        self.engine.train()
        total = MetricSums()
        grad_norms = []
        for shard in minibatches:
            mbs = self.cfg.micro_batch_size
            stats = accumulate_minibatch(
                self.engine, shard, algo_cfg, self._sink, self._reducer, mbs, self.device
            )
            pre_norm = self._grad_norm() if self.cfg.zero_stage == 0 else None
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            grad_norms.append(float(norm if norm is not None else pre_norm))
            total.merge(stats)
        metrics = total.all_reduce(self._reducer).result()
        for k in SUMMED:  # mean of the mini-batch losses
            if k in metrics:
                metrics[k] /= len(minibatches)
        self.version += 1
        metrics |= {
            "actor/grad_norm": sum(grad_norms) / len(grad_norms),
            "actor/lr": float(self.engine.get_lr()[0]),
            "learner/version": float(self.version),
            "learner/step_time_s": time.perf_counter() - start,
        }
        return metrics

    def _grad_norm(self) -> float:
        """Global 2-norm of the (already all-reduced) gradients; ZeRO-0 does not record it."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))

    def get_version(self) -> int:
        return self.version

    # ---- weights and checkpoints ---------------------------------------------------------------

    @torch.no_grad()
    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 state dict (parameters and persistent buffers such as `router_bias`) under the HF /
        vLLM checkpoint names, on rank 0 (None elsewhere). Collective under ZeRO-3."""
        module = self.engine.module
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

    def save_checkpoint(self, path: str) -> None:
        """`path/`: HF-format policy (config, safetensors, tokenizer files copied from the source
        checkpoint) that vLLM loads; `path/trainer_state/`: DeepSpeed optimizer + engine state, per-rank
        RNG states and `learner.json` (version, world size, ZeRO stage). Collective."""
        root = Path(path)
        state = root / "trainer_state"
        state.mkdir(parents=True, exist_ok=True)
        weights = self.export_weights()
        tag = f"version_{self.version}"
        self.engine.save_checkpoint(
            str(state / "deepspeed"), tag=tag, client_state={"version": self.version}, save_latest=True
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
        ds_dir = state / "deepspeed"
        loaded, client = self.engine.load_checkpoint(
            str(ds_dir), tag=meta["tag"], load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise FileNotFoundError(f"{ds_dir}: DeepSpeed found no checkpoint with tag {meta['tag']}")
        self.version = int(client["version"])
        _set_rng_state(torch.load(state / f"rng_rank{self.rank}.pt", weights_only=False))
        dist.barrier()
        return self.version

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """This rank's optimizer state tensors, flattened in a fixed order (tests compare them)."""
        opt = self.engine.optimizer
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
        self.engine = None
        if dist.is_initialized():
            dist.destroy_process_group()


def _export(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.float() if t.is_floating_point() else t).cpu().clone().contiguous()


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
