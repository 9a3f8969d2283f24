"""Learner checkpoints: an HF-format policy that vLLM loads, plus `trainer_state/` for an exact resume
(DeepSpeed engine and optimizer states, the critic's, per-rank RNG states, `learner.json`)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Files of an HF checkpoint directory that `save_pretrained` writes itself; everything else at the top
# level (tokenizer.json, tokenizer_config.json, chat_template.jinja, ...) is copied from the source.
_WEIGHT_FILES = ("config.json", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt")


@dataclass
class Counters:
    """The learner's position, saved with its engines: policy version and LR-schedule optimizer step."""

    version: int
    optimizer_steps: int


def save(
    path: str | Path,
    *,
    engine: Any,
    critic: Any,
    policy: Any,
    weights: dict[str, torch.Tensor] | None,
    counters: Counters,
    rank: int,
    world_size: int,
    zero_stage: int,
    side_files: dict[str, bytes],
    write_extra: Callable[[Path], None] | None = None,
) -> None:
    """`path/`: HF-format policy (`policy.save_pretrained` of `weights`, rank 0's full state under the
    model's names; `side_files` (tokenizer files: `side_files_of`) beside it; then `write_extra(path)` on
    rank 0, e.g. the LoRA adapter); `path/trainer_state/`: DeepSpeed engine states (`deepspeed/`, the
    critic's `critic/`), per-rank RNG states and `learner.json`. Collective."""
    root = Path(path)
    state = root / "trainer_state"
    state.mkdir(parents=True, exist_ok=True)
    tag = f"version_{counters.version}"
    client = {"version": counters.version, "optimizer_steps": counters.optimizer_steps}
    engine.save_checkpoint(str(state / "deepspeed"), tag=tag, client_state=client, save_latest=True)
    if critic is not None:
        critic.save_checkpoint(str(state / "critic"), tag=tag, client_state=client, save_latest=True)
    torch.save(rng_state(), state / f"rng_rank{rank}.pt")
    if rank == 0:
        assert weights is not None
        policy.save_pretrained(root, state_dict=weights)
        for name, content in side_files.items():
            (root / name).write_bytes(content)
        if write_extra is not None:
            write_extra(root)
        meta = {
            "version": counters.version,
            "tag": tag,
            "world_size": world_size,
            "zero_stage": zero_stage,
            "critic": critic is not None,
        }
        (state / "learner.json").write_text(json.dumps(meta, indent=2) + "\n")
    dist.barrier()


def load(
    path: str | Path,
    *,
    engine: Any,
    critic: Any,
    critic_enabled: bool,
    rank: int,
    world_size: int,
    zero_stage: int,
    n_minibatches: int,
) -> Counters:
    """Restore engines, optimizer states and RNG states from `save(path)` output (same number of ranks,
    ZeRO stage and `critic_enabled` setting; all checked before any engine is touched). Collective.
    Returns the saved counters."""
    state = Path(path) / "trainer_state"
    meta_file = state / "learner.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: not a learner checkpoint (written by save_checkpoint)")
    meta = json.loads(meta_file.read_text())
    if (meta["world_size"], meta["zero_stage"]) != (world_size, zero_stage):
        raise ValueError(
            f"{meta_file}: saved with {meta['world_size']} ranks and ZeRO-{meta['zero_stage']}, but this "
            f"learner has {world_size} ranks and ZeRO-{zero_stage}; resume with the same "
            "learner.num_ranks and learner.zero_stage (or start from the HF weights in that directory)"
        )
    saved_critic = bool(meta.get("critic", False))  # checkpoints from before the critic have none
    if saved_critic != critic_enabled:
        had, has = ("a", "no") if saved_critic else ("no", "a")
        raise ValueError(
            f"{meta_file}: saved with {had} critic, but this learner has {has} critic "
            f"(learner.critic.enabled = {critic_enabled}); resume with the setting it was saved "
            "with (or start from the HF weights in that directory)"
        )
    client = _load_engine(engine, state / "deepspeed", meta["tag"])
    if critic is not None:
        _load_engine(critic, state / "critic", meta["tag"])
    version = int(client["version"])
    # checkpoints from before the LR schedule: one optimizer step per version was all there was
    optimizer_steps = int(client.get("optimizer_steps", version * n_minibatches))
    set_rng_state(torch.load(state / f"rng_rank{rank}.pt", weights_only=False))
    dist.barrier()
    return Counters(version, optimizer_steps)


def _load_engine(engine: Any, ds_dir: Path, tag: str) -> dict[str, Any]:
    loaded, client = engine.load_checkpoint(
        str(ds_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise FileNotFoundError(f"{ds_dir}: DeepSpeed found no checkpoint with tag {tag}")
    return client


def side_files_of(src: Path) -> dict[str, bytes]:
    """The files of an HF checkpoint directory besides the weights and the model config (tokenizer,
    chat template, ...), read once when the learner starts: every checkpoint it saves carries them, even
    after the directory it started from was pruned."""
    return {
        f.name: f.read_bytes()
        for f in sorted(src.iterdir())
        if f.is_file() and f.name not in _WEIGHT_FILES and not f.name.endswith(_WEIGHT_SUFFIXES)
    }


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
