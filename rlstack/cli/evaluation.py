"""`rlstack eval`: held-out accuracy of a checkpoint, and the accuracy table `train` prints too."""

from __future__ import annotations

import argparse
from pathlib import Path

from rlstack.config import ConfigError, RunConfig, load_config


def check_checkpoint(path: str | Path) -> Path:
    """`path` if it is an HF checkpoint directory (config.json and weights), else a one-line ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint {path}: no such file or directory")
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path}: not a directory; expected an HF checkpoint directory")
    hint = ""
    latest = path / "checkpoints" / "latest"
    if latest.is_file():  # a run directory
        step = latest.with_name(latest.read_text().strip())
        hint = f"; this is a run directory, its latest checkpoint is {step}"
    if not (path / "config.json").is_file():
        raise ConfigError(f"checkpoint {path}: no config.json, so not an HF checkpoint directory{hint}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ConfigError(f"checkpoint {path}: no weights (*.safetensors or *.bin) next to config.json{hint}")
    return path


def cmd_eval(args: argparse.Namespace) -> int:
    checkpoint = eval_checkpoint(args.checkpoint)  # before transformers and vLLM load
    config: RunConfig = load_config(args.config, eval_overrides(args))

    from transformers import AutoTokenizer

    from rlstack.data.sources import load_split
    from rlstack.evaluate import accuracy
    from rlstack.rewards.group import RewardGroup
    from rlstack.rollout.worker import RolloutWorker

    rows = load_split(config.data, "heldout")[: config.eval.num_problems]
    if not rows:
        raise ConfigError("eval: the data config has no held-out rows (data.heldout_size is 0)")
    # training's scoring path, in this process: the configured deadlines and cache, no Ray actors
    rewards = RewardGroup.in_process(config.rewards, config.reward_workers, config.sandbox)
    worker = RolloutWorker(str(checkpoint), config.rollout, env=config.env, sandbox=config.sandbox)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        result = accuracy(worker, tokenizer, rewards, rows, config)
    finally:
        worker.shutdown()
        rewards.shutdown()
    print_eval_table(None, result)
    return 0


def eval_checkpoint(name: str) -> Path:
    """The checkpoint `rlstack eval` scores: a directory (checked), or the shipped model by name."""
    if name != "smollm2-135m":  # rlstack.model.pretrained.SMOLLM2; importing it loads torch and transformers
        return check_checkpoint(name)
    from rlstack.model.pretrained import PretrainedModelError, resolve_model

    try:
        return resolve_model(name, "checkpoint")
    except PretrainedModelError as e:
        raise ConfigError(str(e)) from None


def eval_overrides(args: argparse.Namespace) -> list[str]:
    """Config changes of `rlstack eval`: a --task replaces the data (and, without a config, the rewards:
    the task's own verifier); --problems sets eval.num_problems; then the user's key=value overrides."""
    overrides: list[str] = []
    task = args.task or (None if args.config else "arithmetic")
    if task is not None:
        from rlstack.data.tasks import TASKS, get_task

        if task not in TASKS:
            raise ConfigError(f"eval --task {task}: unknown task; built-in tasks: {', '.join(sorted(TASKS))}")
        overrides += [f"data.task={task}", "data.path=null", "data.heldout_path=null", "data.columns={}"]
        if args.config is None:  # the task's own verifier, e.g. puzzle for --task puzzle
            overrides.append(f"rewards=[{{name: {get_task(task).reward}}}]")
    if args.problems is not None:
        overrides.append(f"eval.num_problems={args.problems}")
    return overrides + list(args.overrides)


def print_eval_table(before: dict | None, after: dict) -> None:
    n = int(after["num_problems"])
    print(f"\nheld-out accuracy ({n} problems)")
    modes = ["greedy", "sampled"]
    if "greedy_notool_accuracy" in after:  # a run with a tool environment: also without the tool
        modes += ["greedy_notool", "sampled_notool"]
    width = 18 if len(modes) > 2 else 10
    print(f"{'':<{width}}{'before':>10}{'after':>10}" if before else f"{'':<{width}}{'accuracy':>10}")
    for mode in modes:
        key = f"{mode}_accuracy"
        cells = f"{before[key]:>10.1%}{after[key]:>10.1%}" if before else f"{after[key]:>10.1%}"
        print(f"{mode:<{width}}{cells}")
    for mode in ("greedy", "sampled"):  # tool use, with a tool environment
        for key, name, fmt in (
            (f"{mode}_tool_call_rate", "tool calls", ">10.1%"),
            (f"{mode}_turns_mean", "turns", ">10.2f"),
        ):
            if key in after:
                cells = "".join(f"{d[key]:{fmt}}" for d in (before, after) if d)
                print(f"{mode + ' ' + name:<18}{cells}")
    # responses the verifier could not score (error, time-out) are not in the accuracy: say how many
    for mode in ("greedy", "sampled"):
        key = f"{mode}_unscored"
        counts = [int(d.get(key, 0)) for d in (before, after) if d]
        if any(counts):
            print(f"{mode + ' unscored':<18}" + "".join(f"{c:>10d}" for c in counts))
