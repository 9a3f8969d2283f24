"""Sandbox backends by name or by config: the built-in ones, imported only when asked for, and any a
plugin registers. `sandbox_from_config` is the one place that decides which backend a run gets."""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from rlstack.envs.config import SandboxConfig
from rlstack.envs.sandbox import Sandbox, SandboxError

logger = logging.getLogger(__name__)

# Built-in backends as "module:class", strongest first, so that picking one imports only that one.
_BUILT_IN = {
    "docker": "rlstack.envs.docker:DockerSandbox",
    "bubblewrap": "rlstack.envs.bubblewrap:BubblewrapSandbox",
    "process": "rlstack.envs.process:ProcessSandbox",
}
_REGISTERED: dict[str, Callable[..., Sandbox]] = {}


def register_backend(name: str, factory: Callable[..., Sandbox]) -> None:
    """Make `get_sandbox(name)` build a sandbox with `factory(**options)`."""
    if name in _REGISTERED or name in _BUILT_IN:
        raise ValueError(f"sandbox backend '{name}' is already registered")
    _REGISTERED[name] = factory


def backend_class(name: str) -> type[Sandbox]:
    """A built-in backend's class (imported now)."""
    module, attribute = _BUILT_IN[name].split(":")
    cls: type[Sandbox] = getattr(importlib.import_module(module), attribute)
    return cls


def get_sandbox(name: str = "process", **options: Any) -> Sandbox:
    """A sandbox backend by name ("docker", "bubblewrap", "process", or a registered one), built with
    `options` (e.g. `python=` for "process", `image=` for "docker")."""
    if name in _REGISTERED:
        return _REGISTERED[name](**options)
    if name in _BUILT_IN:
        cls = backend_class(name)
        missing = cls.unavailable()
        if missing:
            raise SandboxError(f"sandbox backend '{name}' cannot run on this host: {missing}")
        return cls(**options)
    available = ", ".join(sorted({*_BUILT_IN, *_REGISTERED}))
    raise ValueError(f"unknown sandbox backend '{name}'; available: {available}")


def host_backends() -> dict[str, str | None]:
    """Each built-in backend -> None when this host can run it, else what is missing and how to get it."""
    return {name: backend_class(name).unavailable() for name in _BUILT_IN}


def resolve_backend(config: SandboxConfig) -> str:
    """The backend `config` gets on this host, or a SandboxError saying what is missing and how to get it."""
    if config.backend != "auto":
        cls = backend_class(config.backend)
        if config.strict and not cls.strict:
            raise SandboxError(
                f"sandbox.backend '{config.backend}' does not contain model code strictly (it cannot hide "
                "host files or cap a run's memory as a whole); set sandbox.strict: false to run under it "
                "anyway, or use 'docker' or 'bubblewrap'"
            )
        missing = cls.unavailable()
        if missing:
            raise SandboxError(f"sandbox.backend '{config.backend}' cannot run on this host: {missing}")
        return config.backend
    reasons = []
    for name, missing in host_backends().items():
        if config.strict and not backend_class(name).strict:
            reasons.append(f"{name}: not strict (allowed with sandbox.strict: false)")
        elif missing:
            reasons.append(f"{name}: {missing}")
        else:
            logger.info("sandbox: backend '%s' (auto; %s)", name, "; ".join(reasons) or "the strongest")
            return name
    raise SandboxError("no sandbox backend this run accepts can run on this host: " + " | ".join(reasons))


def sandbox_from_config(config: SandboxConfig) -> Sandbox:
    """The run's sandbox, built from its `sandbox:` section."""
    name = resolve_backend(config)
    options: dict[str, Any] = {}
    if name == "docker":
        options = {"image": config.image, "warm_pool": config.warm_pool}
    return get_sandbox(name, **options)


_run_config: SandboxConfig | None = None
_run_sandbox: Sandbox | None = None
_run_lock = threading.Lock()


def configure(config: SandboxConfig) -> None:
    """Set this process's sandbox (a run's `sandbox:` section): what `run_sandbox()` builds. Reward workers
    and environment pools call it at start-up with the run's config."""
    global _run_config, _run_sandbox
    with _run_lock:
        if _run_config == config:
            return
        if _run_sandbox is not None:
            _run_sandbox.close()
        _run_config, _run_sandbox = config, None


def run_sandbox() -> Sandbox:
    """This process's sandbox, built once from `configure`'s config (default: `SandboxConfig()`, the
    strongest strict backend on the host, or an error saying what is missing)."""
    global _run_sandbox
    with _run_lock:
        if _run_sandbox is None:
            _run_sandbox = sandbox_from_config(_run_config or SandboxConfig())
        return _run_sandbox
