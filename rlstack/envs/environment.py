"""The environment convention: TRL's `environment_factory` contract, unchanged.

An environment is a class (or any factory) that builds one instance per episode:

    class Calculator:
        def reset(self, **row) -> str | None:      # required: the dataset row's columns as keywords;
            self.calls = 0                         # a returned string is appended to the prompt
        def add(self, a: int, b: int) -> int:      # every public method is a tool; its schema comes from
            '''Add two integers.                   # the type hints and the Google-style docstring
            Args:
                a: The first integer.
                b: The second integer.
            '''
            self.calls += 1
            return a + b
        def get_reward(self) -> float:             # optional: the environment scores the episode
            return float(self.calls > 0)

A tool's return value reaches the model as `str(value)`; a tool that raises (or an unknown tool, or bad
arguments) answers `{'error': '...'}`, as in TRL, and the episode goes on. Reward functions get the
episode's environments as `environments=[...]` (TRL's keyword); the `env` reward is `get_reward()`.

Why TRL's: it is the convention with the most users that fits token-in/token-out RL (OpenEnv's
`reset/step` is a server protocol; prime-intellect's `verifiers` environments own the whole rollout
loop); a TRL environment class runs here without a change (tests/integration/test_multiturn.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

RESERVED_METHODS = ("reset", "get_reward")


class EnvError(ValueError):
    """An environment breaks the convention (no `reset`, a tool without a usable schema, a failing
    `reset`) or cannot be found; the message names the environment."""


def env_name(env: Any) -> str:
    """How errors and metrics name an environment: its class's qualified name."""
    cls = type(env)
    return f"{cls.__module__}.{cls.__qualname__}"


def tool_methods(env: Any) -> dict[str, Callable[..., Any]]:
    """The environment's tools, bound: the public functions of its class other than reset / get_reward.
    Listed on the class, so that properties are not evaluated (as TRL does)."""
    return {
        name: getattr(env, name)
        for name, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)
        if name not in RESERVED_METHODS and not name.startswith("_")
    }


def tool_schemas(env: Any) -> list[dict[str, Any]]:
    """The JSON schemas of the environment's tools (transformers' `get_json_schema`: from type hints and a
    Google-style docstring), for a chat template's `tools=`; an EnvError names a tool without one."""
    from transformers.utils import get_json_schema

    schemas = []
    for name, method in tool_methods(env).items():
        try:
            schemas.append(get_json_schema(method))
        except Exception as e:  # transformers' DocstringParsingException / TypeHintParsingException
            raise EnvError(
                f"environment {env_name(env)}: tool '{name}' has no usable schema ({e}); every public "
                "method is a tool and needs type hints and a Google-style docstring with an Args section "
                "(make helpers private with a leading underscore)"
            ) from e
    return schemas


def check_environment(env: Any) -> None:
    """Refuse, with the environment's name, an instance that breaks the convention."""
    if not callable(getattr(env, "reset", None)):
        raise EnvError(f"environment {env_name(env)} has no callable reset(**row) (TRL's contract)")
    reward = getattr(type(env), "get_reward", None)
    if reward is not None and not callable(reward):
        raise EnvError(f"environment {env_name(env)}: get_reward is not callable")
    for name, method in tool_methods(env).items():
        if inspect.iscoroutinefunction(method):
            raise EnvError(
                f"environment {env_name(env)}: tool '{name}' is async; rlstack runs tools in a thread pool, "
                "so write it as a plain function"
            )
    tool_schemas(env)


def reset_environment(env: Any, row: dict[str, Any]) -> str | None:
    """`env.reset(**row)`; what it returns must be None or a string (appended to the prompt)."""
    try:
        observation = env.reset(**row)
    except Exception as e:
        raise EnvError(
            f"environment {env_name(env)}: reset() raised for row {row.get('prompt_id', '?')!r}: "
            f"{type(e).__name__}: {e}"
        ) from e
    if observation is not None and not isinstance(observation, str):
        raise EnvError(
            f"environment {env_name(env)}: reset() returned a {type(observation).__name__}; "
            "it must return None or a string"
        )
    return observation
