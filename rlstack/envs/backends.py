"""Sandbox backends by name: the built-in ones, imported only when asked for, and any a plugin registers."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from rlstack.envs.sandbox import Sandbox

# Built-in backends as "module:attribute", so that picking one imports only that one.
_BUILT_IN = {"process": "rlstack.envs.process:ProcessSandbox"}
_PLANNED = {"docker": "a container per run", "bubblewrap": "bwrap namespaces and a read-only root"}
_REGISTERED: dict[str, Callable[..., Sandbox]] = {}


def register_backend(name: str, factory: Callable[..., Sandbox]) -> None:
    """Make `get_sandbox(name)` build a sandbox with `factory(**options)`."""
    if name in _REGISTERED or name in _BUILT_IN:
        raise ValueError(f"sandbox backend '{name}' is already registered")
    _REGISTERED[name] = factory


def get_sandbox(name: str = "process", **options: Any) -> Sandbox:
    """A sandbox backend by name ("process"), built with `options` (e.g. `python=` for "process")."""
    if name in _REGISTERED:
        return _REGISTERED[name](**options)
    if name in _BUILT_IN:
        module, attribute = _BUILT_IN[name].split(":")
        factory: Callable[..., Sandbox] = getattr(importlib.import_module(module), attribute)
        return factory(**options)
    planned = f" ('{name}' is planned: {_PLANNED[name]}, not implemented yet)" if name in _PLANNED else ""
    available = ", ".join(sorted({*_BUILT_IN, *_REGISTERED}))
    raise ValueError(f"unknown sandbox backend '{name}'{planned}; available: {available}")
