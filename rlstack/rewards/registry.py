"""Reward plugins: the in-tree registry, the `rlstack.rewards` entry-point group, `pkg.mod:fn` import paths,
the checked call and the weighted combiner.

A reward is TRL-compatible, so TRL reward functions drop in unchanged:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

sync or `async def`, called by keyword as TRL does (so `def f(completions, **kwargs)` works too); extra
dataset columns arrive as keyword lists aligned with `completions`; `None` means "does not apply to this
sample". Config names plugins (`RewardSpec`, whose `options` are bound as keyword arguments); callables
never cross Ray. A plugin with per-sample details worth keeping (a compile error, a judge's rationale) may
return `RewardResult(scores, info)` instead of the bare list; the info lands in the run's samples.

    >>> def length_bonus(prompts, completions, **columns):
    ...     return [min(len(c), 10) / 10 for c in completions]
    >>> call_reward(length_bonus, ["p", "p"], ["abc", "a long answer"], name="length_bonus")
    [0.3, 1.0]
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from rlstack.rewards.config import RewardSpec

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "rlstack.rewards"
RewardOutput = list[float | None]
Info = list[dict[str, Any] | None]
RewardFn = Callable[..., RewardOutput | Awaitable[RewardOutput]]

_REWARDS: dict[str, RewardFn] = {}
_BUILTIN_MODULES = (
    "rlstack.rewards.math_verify",
    "rlstack.rewards.puzzle",
    "rlstack.rewards.code_verify",
    "rlstack.rewards.judges.genrm",
    "rlstack.rewards.judges.metarm",
    "rlstack.rewards.judges.preference",
)


class RewardError(ValueError):
    """A reward plugin is unknown, cannot be imported, or returned something unusable; names the plugin."""


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register `fn` as reward `name`; a name can be registered once."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REWARDS:
            existing = _REWARDS[name]
            raise RewardError(
                f"reward '{name}' is already registered ({existing.__module__}.{existing.__qualname__})"
            )
        _REWARDS[name] = fn
        return fn

    return decorator


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def _entry_points() -> dict[str, list[EntryPoint]]:
    """Entry points of the `rlstack.rewards` group by name, re-read each call so new installs show up."""
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, []).append(ep)
    return found


def _dist_name(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "?"


def list_rewards() -> dict[str, str]:
    """Every available reward name -> where it comes from ("rlstack" or "entry point <dist>: <value>")."""
    _load_builtins()
    names = {name: f"{fn.__module__}.{fn.__qualname__}" for name, fn in _REWARDS.items()}
    for name, eps in _entry_points().items():
        names.setdefault(name, "; ".join(f"entry point {_dist_name(ep)}: {ep.value}" for ep in eps))
    return dict(sorted(names.items()))


def reward_names() -> list[str]:
    return list(list_rewards())


def get_reward(name: str) -> RewardFn:
    """A registered reward: in-tree first, then the `rlstack.rewards` entry points of installed packages."""
    _load_builtins()
    if name in _REWARDS:
        return _REWARDS[name]
    eps = _entry_points().get(name, [])
    if not eps:
        raise RewardError(
            f"unknown reward '{name}'; available: {', '.join(reward_names())}. Register it with "
            f"@register('{name}'), an entry point in group '{ENTRY_POINT_GROUP}', "
            "or use import_path: pkg.mod:fn"
        )
    if len({ep.value for ep in eps}) > 1:
        where = ", ".join(sorted(f"{_dist_name(ep)} ({ep.value})" for ep in eps))
        raise RewardError(f"reward '{name}' is provided by several entry points: {where}; uninstall one")
    try:
        fn = eps[0].load()
    except Exception as e:  # a third-party package failing to import: say which one
        raise RewardError(
            f"reward '{name}': cannot load entry point {eps[0].value} of {_dist_name(eps[0])}: {e}"
        ) from e
    return _check_callable(fn, f"reward '{name}' (entry point {eps[0].value})")


def load_import_path(path: str) -> RewardFn:
    """`package.module:function` (or `package.module:Class.attribute`) -> the callable."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"import_path '{path}' must look like package.module:function")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"import_path '{path}': cannot import module '{module_name}': {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"import_path '{path}': '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return _check_callable(obj, f"import_path '{path}'")


def _check_callable(obj: Any, what: str) -> RewardFn:
    if not callable(obj):
        raise RewardError(f"{what} is a {type(obj).__name__}, not a function")
    return obj


def resolve(spec: RewardSpec) -> RewardFn:
    """The plugin a spec names, with the spec's `options` bound as keyword arguments."""
    fn = get_reward(spec.name) if spec.name is not None else load_import_path(str(spec.import_path))
    if spec.options:
        bound = functools.partial(fn, **spec.options)
        functools.update_wrapper(bound, fn)
        return bound
    return fn


# ---- calling -------------------------------------------------------------------------------------------


def _run_coroutine(coro: Awaitable[Any]) -> Any:
    """Run an awaitable to completion from sync code, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(coro))
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(_await(coro))
        except BaseException as e:  # re-raised in the calling thread
            box["error"] = e

    thread = threading.Thread(target=target, name="rlstack-async-reward")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


@dataclass
class RewardResult:
    """What a plugin may return instead of a bare list: the scores plus per-sample details for the report."""

    scores: RewardOutput
    info: list[dict[str, Any] | None]
    """One JSON-serialisable dict (or None) per completion, e.g. {"error": "SyntaxError: ..."}."""


def check_output(out: Any, n: int, name: str) -> RewardOutput:
    """A reward's output as a list of n floats/None, or a RewardError naming the plugin and the problem."""
    if isinstance(out, RewardResult):
        out = out.scores
    try:
        if isinstance(out, str | bytes | Mapping):
            raise TypeError
        values = list(out)
    except TypeError:
        raise RewardError(
            f"reward '{name}' returned {type(out).__name__}; expected a list of {n} floats/None"
        ) from None
    if len(values) != n:
        raise RewardError(
            f"reward '{name}' returned {len(values)} values for {n} completions; "
            "it must return exactly one float (or None) per completion"
        )
    checked: RewardOutput = []
    for i, v in enumerate(values):
        if v is None:
            checked.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardError(
                f"reward '{name}' returned {v!r} at index {i}; expected a float or None"
            ) from None
        if not math.isfinite(f):
            raise RewardError(f"reward '{name}' returned {f} at index {i}; rewards must be finite (or None)")
        checked.append(f)
    return checked


def call_reward(
    fn: RewardFn,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    name: str | None = None,
    **columns: Any,
) -> RewardOutput:
    """Call a sync or async reward on a batch and check its output (length, types, finiteness)."""
    label = name or getattr(fn, "__name__", repr(fn))
    if len(prompts) != len(completions):
        raise ValueError(f"reward '{label}': {len(prompts)} prompts but {len(completions)} completions")
    return check_output(_invoke(fn, prompts, completions, columns), len(completions), label)


def call_reward_with_info(
    fn: RewardFn, prompts: Sequence[Any], completions: Sequence[Any], *, name: str, **columns: Any
) -> tuple[RewardOutput, Info]:
    """`call_reward`, plus the per-sample info of a `RewardResult` (all None for a bare list)."""
    if len(prompts) != len(completions):
        raise ValueError(f"reward '{name}': {len(prompts)} prompts but {len(completions)} completions")
    out = _invoke(fn, prompts, completions, columns)
    scores = check_output(out, len(completions), name)
    info: Info = [None] * len(scores)
    if isinstance(out, RewardResult):
        if len(out.info) != len(scores):
            raise RewardError(
                f"reward '{name}' returned {len(out.info)} info entries for {len(scores)} scores"
            )
        info = list(out.info)
    return scores, info


def _invoke(
    fn: RewardFn, prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Any]
) -> Any:
    # By keyword, as TRL calls them: TRL rewards are often `def f(completions, **kwargs)`.
    out = fn(prompts=list(prompts), completions=list(completions), **columns)
    return _run_coroutine(out) if inspect.isawaitable(out) else out


# ---- combining ----------------------------------------------------------------------------------------


@dataclass
class CombinedRewards:
    total: RewardOutput
    """Weighted sum over the rewards that apply to each sample; None where none applies."""
    per_reward: dict[str, RewardOutput]
    """Each reward's own output, by label (for metrics)."""
    errors: dict[str, int]
    """Samples each reward failed on (raised or returned bad output); those samples got None."""
    info: dict[str, Info] | None = None
    """Per-sample details by label (from `RewardResult`s, or the error text of a failed sample)."""


class RewardCombiner:
    """Resolves the configured rewards once, then scores batches with their weighted sum, in this process.

    No deadlines or cache: the training driver uses `rlstack.rewards.group.RewardGroup`, which adds both.

    >>> combiner = RewardCombiner([RewardSpec(name="puzzle", weight=2.0)])
    >>> combiner(["p"], ["\\\\boxed{2*3+4}"], numbers=[[2, 3, 4]], target=[10]).total
    [2.0]
    """

    def __init__(self, specs: Sequence[RewardSpec]) -> None:
        check_specs(specs)
        self.specs = list(specs)
        self.fns = [resolve(s) for s in specs]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> CombinedRewards:
        per_reward, errors, info = {}, {}, {}
        for spec, fn in zip(self.specs, self.fns, strict=True):
            outcome = call_isolated(fn, spec.label, prompts, completions, columns)
            per_reward[spec.label], errors[spec.label], info[spec.label] = outcome
        total = combine(per_reward, {s.label: s.weight for s in self.specs})
        return CombinedRewards(total, per_reward, errors, info)


def check_specs(specs: Sequence[RewardSpec]) -> None:
    """At least one reward, and no label twice."""
    if not specs:
        raise RewardError("no rewards configured; add at least one, e.g. {name: math}")
    labels = [s.label for s in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise RewardError(f"reward(s) configured twice: {', '.join(duplicates)}")


def call_isolated(
    fn: RewardFn, label: str, prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Any]
) -> tuple[RewardOutput, int, Info]:
    """Call a plugin on the batch; if it fails, call it per sample so one bad sample costs only itself.

    A failing sample scores None (the reward does not apply), its info holds the error, and it is logged
    with the plugin's name and the sample's index; training goes on.
    Returns (scores, number of failed samples, per-sample info).
    """
    try:
        scores, info = call_reward_with_info(fn, prompts, completions, name=label, **columns)
        return scores, 0, info
    except Exception as batch_error:  # a user plugin: any exception is the plugin's, not ours
        logger.error(
            "reward '%s' failed on a batch of %d (%s); retrying per sample", label, len(prompts), batch_error
        )
    scores, info = [], []
    failed = 0
    for i in range(len(prompts)):
        one = {k: [v[i]] for k, v in columns.items()}
        try:
            score, detail = call_reward_with_info(fn, [prompts[i]], [completions[i]], name=label, **one)
            scores.extend(score)
            info.extend(detail)
        except Exception as error:
            failed += 1
            scores.append(None)
            info.append({"error": f"{type(error).__name__}: {error}"})
            logger.error("reward '%s' failed on sample %d: %s: %s", label, i, type(error).__name__, error)
    return scores, failed, info


def combine(per_reward: Mapping[str, RewardOutput], weights: Mapping[str, float]) -> RewardOutput:
    """Per sample: sum of weight * reward over the rewards that are not None; None if all are None.

    >>> combine({"a": [1.0, None, None], "b": [0.5, 1.0, None]}, {"a": 1.0, "b": 2.0})
    [2.0, 2.0, None]
    """
    outputs = list(per_reward.items())
    n = len(outputs[0][1]) if outputs else 0
    total: RewardOutput = []
    for i in range(n):
        applied = [weights[label] * out[i] for label, out in outputs if out[i] is not None]  # type: ignore[operator]
        total.append(sum(applied) if applied else None)
    return total
