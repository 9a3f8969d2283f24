"""Reward plugins: the in-tree registry, the `rlstack.rewards` entry-point group, `pkg.mod:fn` import paths,
options checked at config time, the checked call and the weighted sum (`RewardGroup` in
`rlstack.rewards.group` scores batches with them).

A reward is TRL-compatible, so TRL reward functions (e.g. those in `trl.rewards`) drop in unchanged:

    fn(prompts, completions, completion_ids, **columns) -> list[float | None]

sync or `async def`, called by keyword as TRL's GRPOTrainer calls them (so `def f(completions, **kwargs)`
works too). `prompts` holds each row's prompt as the dataset gives it: a string, or for a conversational row
its list of {"role", "content"} messages; `completions` the generated text, or for a conversational row
`[{"role": "assistant", "content": text}]`; `completion_ids` the generated token ids. Every other dataset
column arrives as a keyword list aligned with `completions`. rlstack passes no `trainer_state`, `log_extra`
or `log_metric`: a score depends on the sample alone, so it can be cached and retried. `None` means "does
not apply to this sample". Plugins with per-sample details worth keeping (a compile error, a judge's
rationale) may return `RewardResult(scores, info)` instead of the bare list; the info lands in the run's
samples.

Config names plugins (`RewardSpec`); callables never cross Ray. A spec's `options` are keyword arguments of
every call, or with `factory: true` the arguments of one call to a factory that returns the reward (TRL's
`get_soft_overlong_punishment(max_completion_len, soft_punish_cache)`). `validate_specs` checks them before
anything starts: against the plugin's pydantic options model (`register(name, options=Model)`, or an
`options_model` attribute of the function or factory), else against its signature.

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
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from rlstack.plugins import dist_name, entry_points_by_name, import_object, load_entry_point, one_line
from rlstack.rewards.config import RewardSpec

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "rlstack.rewards"
RewardOutput = list[float | None]
"""A reward's scores once checked (`check_output`): one float or None per completion."""
Info = list[dict[str, Any] | None]


@dataclass
class RewardResult:
    """What a plugin may return instead of a bare list: the scores plus per-sample details for the report."""

    scores: RewardOutput
    info: list[dict[str, Any] | None]
    """One JSON-serialisable dict (or None) per completion, e.g. {"error": "SyntaxError: ..."}."""


RewardReturn = Sequence[float | None] | RewardResult
"""What a plugin may return: one float (or None) per completion, or a `RewardResult` (`check_output`)."""
RewardFn = Callable[..., RewardReturn | Awaitable[RewardReturn]]
"""A reward plugin, sync or `async def`, called by keyword (see the module docstring)."""
PluginFn = TypeVar("PluginFn", bound=RewardFn)
Options = TypeVar("Options", bound=BaseModel)

CALL_ARGS = ("prompts", "completions", "completion_ids")
"""What every reward call passes by keyword besides the columns, as TRL's GRPOTrainer does."""
OPTIONS_ATTR = "options_model"
USES_SANDBOX_ATTR = "uses_sandbox"
"""Attribute of a reward (or factory) holding the pydantic model of its options; set by `register`."""

_REWARDS: dict[str, RewardFn] = {}
_BUILTIN_MODULES = (
    "rlstack.rewards.math_verify",
    "rlstack.rewards.puzzle",
    "rlstack.rewards.overlong",
    "rlstack.rewards.code_verify",
    "rlstack.rewards.env_reward",
    "rlstack.rewards.judges.genrm",
    "rlstack.rewards.judges.metarm",
    "rlstack.rewards.judges.preference",
)


class RewardError(ValueError):
    """A reward plugin is unknown, cannot be imported, or returned something unusable; names the plugin."""


def register(
    name: str, options: type[BaseModel] | None = None, uses_sandbox: bool = False
) -> Callable[[PluginFn], PluginFn]:
    """Decorator: register `fn` as reward `name`; a name can be registered once. `options`: the pydantic
    model of the options it takes (stored as `fn.options_model`), which a config's options must pass.
    `uses_sandbox`: it runs model-written code in the run's sandbox (`fn.uses_sandbox`), so a reward
    worker builds that sandbox at start-up and a host that cannot give it fails the run there.
    Returns `fn` itself (its signature intact, for direct calls)."""

    def decorator(fn: PluginFn) -> PluginFn:
        if name in _REWARDS:
            existing = _REWARDS[name]
            raise RewardError(
                f"reward '{name}' is already registered ({existing.__module__}.{existing.__qualname__})"
            )
        if options is not None:
            setattr(fn, OPTIONS_ATTR, options)
        if uses_sandbox:
            setattr(fn, USES_SANDBOX_ATTR, True)
        _REWARDS[name] = fn
        return fn

    return decorator


def needs_sandbox(specs: Sequence[RewardSpec]) -> bool:
    """Whether any of these rewards runs model-written code in the sandbox (`register(uses_sandbox=)`)."""
    return any(getattr(load_plugin(spec), USES_SANDBOX_ATTR, False) for spec in specs)


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def _entry_points() -> dict[str, list[EntryPoint]]:
    """Entry points of the `rlstack.rewards` group by name, re-read each call so new installs show up."""
    return entry_points_by_name(ENTRY_POINT_GROUP)


def list_rewards() -> dict[str, str]:
    """Every available reward name -> where it comes from ("rlstack" or "entry point <dist>: <value>")."""
    _load_builtins()
    names = {name: f"{fn.__module__}.{fn.__qualname__}" for name, fn in _REWARDS.items()}
    for name, eps in _entry_points().items():
        names.setdefault(name, "; ".join(f"entry point {dist_name(ep)}: {ep.value}" for ep in eps))
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
    fn = load_entry_point(eps, f"reward '{name}'", RewardError)
    return _check_callable(fn, f"reward '{name}' (entry point {eps[0].value})")


def load_import_path(path: str) -> RewardFn:
    """`package.module:function` (or `package.module:Class.attribute`) -> the callable."""
    obj = import_object(path, RewardError)
    return _check_callable(obj, f"import_path '{path}'")


def _check_callable(obj: Any, what: str) -> RewardFn:
    if not callable(obj):
        raise RewardError(f"{what} is a {type(obj).__name__}, not a function")
    return obj


# ---- options and resolving ------------------------------------------------------------------------------


class NoOptions(BaseModel):
    """The options model of a reward that takes none: any option is an error."""

    model_config = ConfigDict(extra="forbid")


def options_model(fn: Any) -> type[BaseModel] | None:
    """The pydantic model of a reward's (or factory's) options: its `options_model` attribute, if any."""
    model = getattr(fn, OPTIONS_ATTR, None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def parse_options(model: type[Options], options: Mapping[str, Any], name: str) -> Options:
    """`options` validated by `model`, or a one-line RewardError naming the reward and the bad option.

    >>> class ScaleOptions(BaseModel):
    ...     scale: float = 1.0
    >>> parse_options(ScaleOptions, {"scale": "2"}, "mine").scale
    2.0
    >>> parse_options(ScaleOptions, {"scael": 2}, "mine")
    Traceback (most recent call last):
    ...
    rlstack.rewards.registry.RewardError: reward 'mine': unknown option 'scael'; options: scale
    """
    unknown = [key for key in options if key not in model.model_fields]
    if unknown:
        known = ", ".join(model.model_fields) or "(none: it takes no options)"
        raise RewardError(f"reward '{name}': unknown option '{unknown[0]}'; options: {known}")
    try:
        return model.model_validate(dict(options))
    except ValidationError as e:
        error = e.errors()[0]
        cause = error.get("ctx", {}).get("error")
        message = " ".join(str(cause if isinstance(cause, Exception) else error["msg"]).split())
        if not error["loc"]:  # a check across options (a model validator)
            raise RewardError(f"reward '{name}': {message}") from None
        where = ".".join(str(part) for part in error["loc"])
        got = f" (got {error['input']!r:.60})" if error["type"] != "missing" else ""
        raise RewardError(f"reward '{name}': option '{where}': {message}{got}") from None


def split_options(
    model: type[Options], kwargs: Mapping[str, Any], name: str
) -> tuple[Options, dict[str, Any]]:
    """A call's keyword arguments -> (the validated options `model` names, the rest: the columns)."""
    options = parse_options(model, {k: v for k, v in kwargs.items() if k in model.model_fields}, name)
    return options, {k: v for k, v in kwargs.items() if k not in model.model_fields}


def load_plugin(spec: RewardSpec) -> RewardFn:
    """The callable a spec names, unbound: the reward, or with `factory: true` the factory."""
    return get_reward(spec.name) if spec.name is not None else load_import_path(str(spec.import_path))


def check_spec(spec: RewardSpec) -> tuple[RewardFn, dict[str, Any]]:
    """A spec's plugin and its options checked (by its options model, else by its signature): the plugin
    and the options to bind, or a RewardError naming the reward."""
    fn = load_plugin(spec)
    label = spec.label
    reserved = [] if spec.factory else [k for k in spec.options if k in CALL_ARGS]
    if reserved:
        raise RewardError(f"reward '{label}': option '{reserved[0]}' is what every call passes; rename it")
    model = options_model(fn)
    if model is not None:
        parsed = parse_options(model, spec.options, label)
        options = {key: getattr(parsed, key) for key in spec.options}
    else:
        _check_against_signature(fn, spec.options, label, spec.factory)
        options = dict(spec.options)
    if not spec.factory:
        check_call_signature(fn, label)
    return fn, options


def validate_specs(specs: Sequence[RewardSpec]) -> None:
    """Check a run's rewards before anything starts: at least one, no label twice, each name or import path
    found and callable, each reward's options valid. Raises a one-line RewardError naming the reward."""
    check_specs(specs)
    for spec in specs:
        check_spec(spec)


def resolve(spec: RewardSpec) -> RewardFn:
    """The reward a spec configures: the plugin with the spec's `options` bound as keyword arguments, or with
    `factory: true` what the factory returns when called once with them."""
    fn, options = check_spec(spec)
    if spec.factory:
        try:
            made: Any = fn(**options)  # `fn` is the factory here: it returns the reward
        except Exception as e:  # the user's factory refusing its options: any error is theirs
            raise RewardError(f"reward '{spec.label}': the factory raised {one_line(e)}") from e
        reward = _check_callable(made, f"reward '{spec.label}': what the factory returned")
        check_call_signature(reward, spec.label, factory=True)
        return reward
    if options:
        bound = functools.partial(fn, **options)
        functools.update_wrapper(bound, fn)
        return bound
    return fn


def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have none: nothing to check
        return None


def check_call_signature(fn: Any, name: str, factory: bool = False) -> None:
    """A reward must take `prompts`, `completions` and `completion_ids` by keyword (or **kwargs)."""
    sig = _signature(fn)
    if sig is None or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    keyword = {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [arg for arg in CALL_ARGS if arg not in keyword]
    if missing:
        hint = "" if factory else ", or set `factory: true` if it returns the reward function"
        raise RewardError(
            f"reward '{name}' does not take {', '.join(missing)} (it takes {', '.join(sig.parameters)}); "
            "rewards are called as fn(prompts=, completions=, completion_ids=, **columns): "
            f"add **kwargs{hint}"
        )


def _check_against_signature(fn: Any, options: Mapping[str, Any], name: str, factory: bool) -> None:
    """Without an options model: no option the function (or factory) cannot take, none a factory needs
    missing, and each option of the annotated type where pydantic can check it."""
    sig = _signature(fn)
    if sig is None:
        return
    params = sig.parameters
    keyword = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    what = "the factory" if factory else "it"
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [key for key in options if key not in keyword]
        if unknown:
            takes = ", ".join(keyword) or "(none)"
            raise RewardError(f"reward '{name}': unknown option '{unknown[0]}'; {what} takes: {takes}")
    if factory:
        missing = [n for n in keyword if params[n].default is params[n].empty and n not in options]
        if missing:
            raise RewardError(f"reward '{name}': the factory needs option '{missing[0]}'")
    hints = _type_hints(fn)
    for key, value in options.items():
        if key not in hints:
            continue
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(hints[key])
        except Exception:  # an annotation pydantic cannot build a validator for: leave it unchecked
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as e:
            message = " ".join(e.errors()[0]["msg"].split())
            raise RewardError(f"reward '{name}': option '{key}': {message} (got {value!r:.60})") from None


def _type_hints(fn: Any) -> dict[str, Any]:
    target = fn
    if inspect.isclass(fn):
        target = fn.__init__
    elif not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        target = type(fn).__call__
    try:
        return typing.get_type_hints(target)
    except Exception:  # the plugin's annotations may name what its module never imports: check none
        return {}


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
    label: str = name if name else getattr(fn, "__name__", repr(fn))
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


RESERVED_LABELS = frozenset(
    {"mean", "std", "accuracy", "unscored", "unscored_frac", "cache_hits", "workers_restarted"}
)
"""Names of the step's own `reward/<name>` metrics (rlstack.step_metrics, the driver): a reward labelled so
would overwrite them."""


def check_specs(specs: Sequence[RewardSpec]) -> None:
    """At least one reward, no label twice, and none that would overwrite a `reward/...` metric."""
    if not specs:
        raise RewardError("no rewards configured; add at least one, e.g. {name: math}")
    labels = [s.label for s in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise RewardError(f"reward(s) configured twice: {', '.join(duplicates)}")
    reserved = sorted(label for label in labels if label in RESERVED_LABELS)
    if reserved:
        raise RewardError(
            f"reward label(s) {', '.join(reserved)} would overwrite the metric reward/<label> of the same "
            "name; register the reward under another name"
        )


def sample_name(i: int, sample_ids: Sequence[str] | None) -> str:
    """How messages name sample `i` of a batch: its index, and its prompt id when known."""
    return f"sample {i}" if sample_ids is None else f"sample {i} (prompt {sample_ids[i]})"


def failure_info(error: str, i: int, sample_ids: Sequence[str] | None) -> dict[str, Any]:
    """A failed sample's info: the error, and the sample's prompt id when known."""
    return {"error": error} if sample_ids is None else {"error": error, "prompt_id": sample_ids[i]}


def combine(per_reward: Mapping[str, RewardOutput], weights: Mapping[str, float]) -> RewardOutput:
    """Per sample: sum of weight * reward over the rewards that are not None; None if all are None.

    >>> combine({"a": [1.0, None, None], "b": [0.5, 1.0, None]}, {"a": 1.0, "b": 2.0})
    [2.0, 2.0, None]
    """
    outputs = list(per_reward.items())
    n = len(outputs[0][1]) if outputs else 0
    total: RewardOutput = []
    for i in range(n):
        applied = [weights[label] * value for label, out in outputs if (value := out[i]) is not None]
        total.append(sum(applied) if applied else None)
    return total
