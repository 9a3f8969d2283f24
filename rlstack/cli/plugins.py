"""`rlstack rewards list|try`, `rlstack envs list`: the reward and environment plugins."""

from __future__ import annotations

import argparse
from typing import Any

from rlstack.config import ConfigError


def cmd_envs_list(args: argparse.Namespace) -> int:
    from rlstack.envs.registry import list_envs

    for name, origin in list_envs().items():
        print(f"{name:<20}{origin}")
    return 0


def cmd_rewards_list(args: argparse.Namespace) -> int:
    from rlstack.rewards.registry import list_rewards

    for name, origin in sorted(list_rewards().items()):
        print(f"{name:<20}{origin}")
    return 0


def cmd_rewards_try(args: argparse.Namespace) -> int:
    import json

    from rlstack.data.sources import load_rows
    from rlstack.rewards.config import RewardWorkersConfig
    from rlstack.rewards.group import RewardGroup
    from rlstack.rewards.scoring import sample_info, score_samples, unscored_reason

    spec = try_spec(args.reward, args.options, args.factory)
    if args.rows < 1 or args.time_limit_s <= 0:
        raise ConfigError("--rows must be at least 1 and --time-limit-s above 0")
    rows = load_rows(args.data)[: args.rows]
    texts = [try_completion(row, args.completion_column, args.data) for row in rows]
    group = RewardGroup.in_process([spec], RewardWorkersConfig(time_limit_s=args.time_limit_s, cache_size=0))
    skip = {"prompt", "prompt_id", "completion_ids", args.completion_column}
    result = score_samples(
        group,
        [row["prompt"] for row in rows],
        [{k: v for k, v in row.items() if k not in skip} for row in rows],
        texts,
        [row.get("completion_ids") or [] for row in rows],
        [row["prompt_id"] for row in rows],
    )
    label = spec.label
    print(
        f"reward '{label}' on {len(rows)} row(s) of {args.data}, completions from '{args.completion_column}'"
    )
    for i, row in enumerate(rows):
        score = result.per_reward[label][i]
        details = sample_info(result, i)
        shown = f"score {score:g}" if score is not None else f"unscored: {unscored_reason(details)}"
        print(f"row {i + 1} (prompt_id {row['prompt_id']}): {shown}")
        if label in details:
            print(f"    info: {json.dumps(details[label], default=str, ensure_ascii=False)}")
    scored = [s for s in result.per_reward[label] if s is not None]
    mean = f", mean {sum(scored) / len(scored):.4g}" if scored else ""
    print(
        f"{len(scored)} scored, {len(rows) - len(scored)} unscored (errors {result.errors[label]}, "
        f"timeouts {result.timeouts[label]}){mean}; training leaves unscored samples out of the loss"
    )
    return 0


def try_spec(reward: str, options: str, factory: bool) -> Any:
    """The `RewardSpec` of `rlstack rewards try`, checked like a config's (a ConfigError or RewardError)."""
    import json

    from pydantic import ValidationError

    from rlstack.rewards.config import RewardSpec
    from rlstack.rewards.registry import validate_specs

    try:
        parsed = json.loads(options)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--options: not JSON ({e}); e.g. --options '{{\"scale\": 2}}'") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"--options must be a JSON object, got {options!r:.60}")
    source = "import_path" if ":" in reward else "name"
    try:
        spec = RewardSpec(**{source: reward}, options=parsed, factory=factory)
    except ValidationError as e:
        raise ConfigError(f"reward '{reward}': {e.errors()[0]['msg']}") from None
    validate_specs([spec])
    return spec


def try_completion(row: dict[str, Any], column: str, path: str) -> str:
    """A row's completion text: the column's string, or the contents of its list of messages."""
    value = row.get(column)
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        value = "".join(str(m["content"]) for m in value)
    if not isinstance(value, str):
        columns = ", ".join(sorted(k for k in row if k != "prompt_id"))
        raise ConfigError(
            f"{path}: row {row['prompt_id']}: completion column '{column}' is "
            f"{'missing' if column not in row else f'not text ({value!r:.60})'}; columns: {columns}; "
            "choose one with --completion-column"
        )
    return value
