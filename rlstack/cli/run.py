"""`rlstack config`, `rlstack train`, `rlstack sft`: validate a config, run the RL loop, warm-start."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from rlstack.cli.evaluation import print_eval_table
from rlstack.config import ConfigError, RunConfig, check_resume_config, dump_config, load_config


def cmd_config(args: argparse.Namespace) -> int:
    config: RunConfig = load_config(args.config, args.overrides)
    from rlstack.data.sources import load_split
    from rlstack.rewards.registry import validate_specs

    validate_specs(config.rewards)  # names, import paths and options resolve
    if config.env is not None:  # the environment found, its options valid, one instance checked
        from rlstack.envs.registry import env_tool_schemas

        env_tool_schemas(config.env)
    if config.data.path is not None:  # a bad row or column mapping fails here, not after Ray starts
        load_split(config.data, "train")
    if args.out:
        dump_config(config, Path(args.out) / "config.resolved.yaml")
        print(f"wrote {Path(args.out) / 'config.resolved.yaml'}")
    else:
        import yaml

        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"trainer.run_dir={args.resume}")
    elif args.allow_config_change:
        raise ConfigError("--allow-config-change only applies with --resume RUN_DIR")
    config: RunConfig = load_config(args.config, overrides)
    if args.resume:
        changes = check_resume_config(Path(args.resume), config, args.allow_config_change)
        if changes:
            print(
                f"--allow-config-change: resuming {args.resume} with a changed config:\n  "
                + "\n  ".join(changes),
                file=sys.stderr,
            )

    from rlstack.driver import Trainer

    with Trainer(config, resume=bool(args.resume), allow_config_change=args.allow_config_change) as trainer:
        result = trainer.fit(progress=not args.no_progress)
    if result.get("stopped") is not None:  # SIGINT / SIGTERM: saved, everything shut down
        run_dir = config.trainer.run_dir
        print(f"stopped by {result['stopped']}; checkpoint: {result['checkpoint']}")
        print(f"continue with: rlstack train {args.config} --resume {run_dir}")
        return 128 + int(signal.Signals[result["stopped"]])
    print_eval_table(result["before"], result["after"])
    print(f"final checkpoint: {result['checkpoint']}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from rlstack.sft import run_sft

    config: RunConfig = load_config(args.config, args.overrides)
    path = run_sft(config, progress=not args.no_progress)
    print(f"warm-started policy: {path}")
    return 0
