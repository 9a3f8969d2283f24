"""Finding user code by name, shared by every plugin kind (rewards, environments): an entry point of an
installed package, or a `package.module:attribute` import path. Each kind keeps its own registry and error
type; this module only loads, and says which plugin failed and why in one line."""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points
from typing import Any


def entry_points_by_name(group: str) -> dict[str, list[EntryPoint]]:
    """The entry points of `group` by name, re-read each call so new installs show up."""
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=group):
        found.setdefault(ep.name, []).append(ep)
    return found


def dist_name(ep: EntryPoint) -> str:
    """The distribution that provides an entry point ("?" if unknown)."""
    return ep.dist.name if ep.dist is not None else "?"


def load_entry_point(eps: list[EntryPoint], what: str, error: type[Exception]) -> Any:
    """The object behind one name's entry points (`what`: e.g. "reward 'x'"); several different values or a
    failing import raise `error` naming the packages."""
    if len({ep.value for ep in eps}) > 1:
        where = ", ".join(sorted(f"{dist_name(ep)} ({ep.value})" for ep in eps))
        raise error(f"{what} is provided by several entry points: {where}; uninstall one")
    try:
        return eps[0].load()
    except Exception as e:  # a third-party package failing to import: say which one
        raise error(f"{what}: cannot load entry point {eps[0].value} of {dist_name(eps[0])}: {e}") from e


def import_object(path: str, error: type[Exception], example: str = "package.module:function") -> Any:
    """`package.module:attribute` (or `package.module:Class.attribute`) -> the object, or `error` saying
    which part is missing."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise error(f"import_path '{path}' must look like {example}")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # the user's module failing to import (any error): say which one
        raise error(f"import_path '{path}': cannot import module '{module_name}': {one_line(e)}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"import_path '{path}': '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def one_line(error: BaseException) -> str:
    """An exception as one line: its type and message (an ImportError's message already says enough)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if not isinstance(error, ImportError) else text
