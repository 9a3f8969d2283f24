"""Environments by name, like rewards: the in-tree registry (`@register_env`), the `rlstack.envs` entry-point
group, or a `package.module:Class` import path. `env_factory(config)` is the one place that turns an
`env:` section into a checked factory of instances."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from rlstack.envs.config import EnvConfig
from rlstack.envs.environment import EnvError, check_environment, tool_schemas
from rlstack.plugins import entry_points_by_name, import_object, load_entry_point

ENTRY_POINT_GROUP = "rlstack.envs"
_ENVS: dict[str, Callable[..., Any]] = {}
_BUILTIN_MODULES = ("rlstack.envs.python_tool",)
OPTIONS_ATTR = "options_model"
USES_SANDBOX_ATTR = "uses_sandbox"
Factory = TypeVar("Factory", bound=Callable[..., Any])


def register_env(
    name: str, options: type[BaseModel] | None = None, uses_sandbox: bool = False
) -> Callable[[Factory], Factory]:
    """Decorator: register an environment class (or factory) as `name`. `options`: the pydantic model of
    its constructor's keyword arguments (an `env:` section's `options` must pass it). `uses_sandbox`: its
    tools run model-written code in the run's sandbox, so a rollout worker builds that sandbox at start-up
    and a host that cannot give it fails the run there."""

    def decorator(factory: Factory) -> Factory:
        if name in _ENVS:
            raise EnvError(f"environment '{name}' is already registered ({_ENVS[name].__qualname__})")
        if options is not None:
            setattr(factory, OPTIONS_ATTR, options)
        if uses_sandbox:
            setattr(factory, USES_SANDBOX_ATTR, True)
        _ENVS[name] = factory
        return factory

    return decorator


def list_envs() -> dict[str, str]:
    """Every available environment name -> where it comes from."""
    _load_builtins()
    names = {name: f"{f.__module__}.{f.__qualname__}" for name, f in _ENVS.items()}
    for name, eps in entry_points_by_name(ENTRY_POINT_GROUP).items():
        names.setdefault(name, "; ".join(f"entry point {ep.value}" for ep in eps))
    return dict(sorted(names.items()))


def get_env(name: str) -> Callable[..., Any]:
    """A registered environment factory: in-tree first, then the `rlstack.envs` entry points."""
    _load_builtins()
    if name in _ENVS:
        return _ENVS[name]
    eps = entry_points_by_name(ENTRY_POINT_GROUP).get(name, [])
    if not eps:
        raise EnvError(
            f"unknown environment '{name}'; available: {', '.join(list_envs()) or '(none)'}. Register it "
            f"with @register_env('{name}'), an entry point in group '{ENTRY_POINT_GROUP}', or use "
            "import_path: pkg.mod:Class"
        )
    return _callable(load_entry_point(eps, f"environment '{name}'", EnvError), f"environment '{name}'")


def load_env(config: EnvConfig) -> Callable[..., Any]:
    """The class or factory an `env:` section names (unbound)."""
    if config.name is not None:
        return get_env(config.name)
    return _callable(
        import_object(str(config.import_path), EnvError, "package.module:Class"),
        f"import_path '{config.import_path}'",
    )


def env_uses_sandbox(config: EnvConfig) -> bool:
    """Whether the environment's tools run code in the run's sandbox (`register_env(uses_sandbox=)`)."""
    return bool(getattr(load_env(config), USES_SANDBOX_ATTR, False))


def env_factory(config: EnvConfig) -> Callable[[], Any]:
    """A factory of checked instances with the config's options bound. One probe instance is built and
    checked now (reset, tool schemas), so a broken environment fails the run at start-up, named."""
    factory = load_env(config)
    options = _check_options(factory, config)
    bound = functools.partial(factory, **options)
    try:
        probe = bound()
    except Exception as e:
        raise EnvError(f"environment '{config.label}': building it raised {type(e).__name__}: {e}") from e
    check_environment(probe)
    close_environment(probe)
    return bound


def env_tool_schemas(config: EnvConfig | None) -> list[dict[str, Any]] | None:
    """The JSON schemas of an `env:` section's tools (for the chat template's `tools=`); None without one."""
    if config is None:
        return None
    env = env_factory(config)()
    try:
        return tool_schemas(env)
    finally:
        close_environment(env)


def close_environment(env: Any) -> None:
    """Call an instance's `close()`, if it has one (releasing what its tools hold)."""
    close = getattr(env, "close", None)
    if callable(close):
        close()


def _check_options(factory: Callable[..., Any], config: EnvConfig) -> dict[str, Any]:
    model = getattr(factory, OPTIONS_ATTR, None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return dict(config.options)
    unknown = [key for key in config.options if key not in model.model_fields]
    if unknown:
        known = ", ".join(model.model_fields) or "(none)"
        raise EnvError(f"environment '{config.label}': unknown option '{unknown[0]}'; options: {known}")
    try:
        model.model_validate(config.options)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise EnvError(f"environment '{config.label}': option '{where}': {error['msg']}") from None
    return dict(config.options)


def _callable(obj: Any, what: str) -> Callable[..., Any]:
    if not callable(obj):
        raise EnvError(f"{what} is a {type(obj).__name__}, not a class or factory")
    return obj  # type: ignore[no-any-return]


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
