"""Run set-up shared by the RL driver, SFT and evaluation: Ray, the initial policy, checkpoint paths.

Importing it loads neither torch nor the driver, so `rlstack.driver`, `rlstack.sft` and `rlstack.evaluate`
can all use it without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlstack.config import RunConfig
from rlstack.run_dir import CHECKPOINTS


def init_ray(cfg: RunConfig) -> bool:
    """Join a cluster (`trainer.ray_address`, or RAY_ADDRESS under `ray job submit`); else start one.
    Returns whether this call started Ray (so the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.trainer.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Actors import what this process can: reward plugins by import_path, local modules.
        runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(local_import_paths())}}
        ray.init(
            num_cpus=cfg.trainer.local_cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=runtime_env,
        )
    return True


def local_import_paths() -> list[str]:
    """This process's import path minus the interpreter's own (stdlib, site-packages): the working directory,
    PYTHONPATH, and what a test runner added."""
    import sys

    own = [Path(p).resolve() for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}]
    paths: list[str] = []
    for entry in sys.path:
        path = Path(entry or os.getcwd()).resolve()
        if path.is_dir() and not any(path.is_relative_to(p) for p in own) and str(path) not in paths:
            paths.append(str(path))
    return paths


def initial_policy(cfg: RunConfig, run_dir: Path) -> Path:
    """The policy a run starts from: `model.path` (a checkpoint directory, or `smollm2-135m`: the shipped
    SmolLM2-135M-Instruct, converted once into the cache), else a fresh `model.builder` checkpoint in the run
    directory (written once, reused on later calls)."""
    if cfg.model.path is not None:
        from rlstack.config_base import ConfigError
        from rlstack.model.pretrained import PretrainedModelError, resolve_model

        try:
            return resolve_model(cfg.model.path, "model.path")
        except PretrainedModelError as e:
            raise ConfigError(str(e)) from None
    from rlstack.model import BUILDERS, init_checkpoint
    from rlstack.run_dir import publish, staging_dir

    path = run_dir / CHECKPOINTS / "init"
    if not path.exists():  # written whole, then renamed into place: never half there
        staging = staging_dir(run_dir, "init")
        init_checkpoint(BUILDERS[cfg.model.builder](), staging, seed=cfg.model.init_seed)
        publish(staging, path)
    return path


def check_env(cfg: RunConfig) -> list[dict[str, Any]] | None:
    """Check a run's `env:` before anything starts: the environment found, its options valid, one instance
    built and checked (reset, tool schemas), and the sandbox its tools need present on this host. Returns
    the tools' JSON schemas (None without an `env:`)."""
    if cfg.env is None:
        return None
    from rlstack.envs.backends import resolve_backend
    from rlstack.envs.registry import env_tool_schemas, env_uses_sandbox

    if env_uses_sandbox(cfg.env):
        resolve_backend(cfg.sandbox)
    return env_tool_schemas(cfg.env)
