"""`rlstack` command line: the parser and the entry point; each subcommand lives in the module of its
topic (run, evaluation, plugins, model, sandbox, report). Each subcommand parses its config before
importing torch/vLLM, so user mistakes fail fast with a one-line message (exit 2) instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import get_args

from rlstack.cli.evaluation import cmd_eval
from rlstack.cli.model import cmd_model_check, cmd_model_init
from rlstack.cli.plugins import cmd_envs_list, cmd_rewards_list, cmd_rewards_try
from rlstack.cli.report import add_report_budgets, cmd_dashboard, cmd_report
from rlstack.cli.run import cmd_config, cmd_sft, cmd_train
from rlstack.cli.sandbox import cmd_sandbox_build_image, cmd_sandbox_setup, cmd_sandbox_status
from rlstack.config import BuilderName, ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except Exception as e:
        if not isinstance(e, user_error_types()):
            raise  # a bug, not a user mistake: keep the traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def user_error_types() -> tuple[type[Exception], ...]:
    """The errors that mean the user's config, data or reward plugins are wrong (one line, exit 2).

    DataError, RewardError, EnvError, SandboxError and UnsupportedModelError are taken from sys.modules: none
    can be raised before its module is loaded, and importing them here would load the plugins before the
    config is parsed.
    """
    types: list[type[Exception]] = [ConfigError]
    for module, name in (
        ("rlstack.data.sources", "DataError"),
        ("rlstack.rewards.registry", "RewardError"),
        ("rlstack.envs.environment", "EnvError"),
        ("rlstack.envs.sandbox", "SandboxError"),
        ("rlstack.model.auto", "UnsupportedModelError"),
    ):
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlstack",
        description="RL post-training for Mixture-of-Experts LMs: vLLM rollouts, DeepSpeed learners, MIS-PO.",
    )
    sub = parser.add_subparsers(title="subcommands", metavar="COMMAND")

    p = sub.add_parser(
        "config",
        help="validate a config (+ key=value overrides), its rewards and its data file; print or save it "
        "resolved",
    )
    p.add_argument("config", help="YAML file, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=20")
    p.add_argument("--out", help="run directory to write config.resolved.yaml into")
    p.set_defaults(handler=cmd_config)

    p = sub.add_parser("train", help="run the RL loop (local Ray, or the cluster under `ray job submit`)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-5")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint; refused if the config differs from "
        "RUN_DIR/config.resolved.yaml, except trainer.steps (raise it to extend a run; settings derived "
        "from it, such as an unset learner.lr_decay_steps, still count)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: go on with a changed config (the differences are printed)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("sft", help="supervised warm start on the task's demonstrations")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=cmd_sft)

    p = sub.add_parser("eval", help="held-out accuracy of a checkpoint with vLLM (greedy and sampled)")
    p.add_argument("checkpoint", help="an HF checkpoint directory, or smollm2-135m (the shipped model)")
    p.add_argument(
        "--task",
        help="built-in task (rlstack.data.tasks), scored by its own verifier; default: the --config's data "
        "(its held-out split: data.heldout_path, or the held-out prompts of data.path) and rewards, else "
        "arithmetic",
    )
    p.add_argument("--problems", type=int, help="held-out problems (default: the config's eval.num_problems)")
    p.add_argument("--config", help="run YAML whose data, rewards, rollout, eval and env sections to use")
    p.add_argument("overrides", nargs="*", help="key=value changes to the config, as for train")
    p.set_defaults(handler=cmd_eval)

    rewards = sub.add_parser("rewards", help="reward plugins").add_subparsers(metavar="ACTION")
    p = rewards.add_parser("list", help="registered rewards: in-tree and from installed entry points")
    p.set_defaults(handler=cmd_rewards_list)
    p = rewards.add_parser(
        "try",
        help="score a few rows of a data file through the path training uses (deadlines, per-sample "
        "isolation, TRL-style arguments); print each row's score, unscored rows with the reason, and info",
    )
    p.add_argument("reward", metavar="NAME_OR_IMPORT_PATH", help="a registered name, or pkg.mod:fn")
    p.add_argument("data", metavar="DATA.jsonl", help="rows as training reads them, plus a completion column")
    p.add_argument("--options", default="{}", metavar="JSON", help="the reward's options, a JSON object")
    p.add_argument("--factory", action="store_true", help="the reward is a factory called with the options")
    p.add_argument("--rows", type=int, default=8, help="rows to score (the first N)")
    p.add_argument(
        "--completion-column",
        default="completion",
        metavar="COL",
        help="column holding each row's completion (text, or a list of messages); optional column "
        "`completion_ids` gives the token ids (else empty lists)",
    )
    p.add_argument(
        "--time-limit-s", type=float, default=60.0, help="deadline of each plugin call, as reward_workers"
    )
    p.set_defaults(handler=cmd_rewards_try)

    model = sub.add_parser("model", help="create or check policy checkpoints").add_subparsers(
        metavar="ACTION"
    )
    p = model.add_parser("init", help="write a freshly initialised policy checkpoint (HF format, vLLM-ready)")
    p.add_argument("path")
    p.add_argument("--builder", choices=get_args(BuilderName), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_model_init)
    p = model.add_parser(
        "check", help="vLLM vs PyTorch (transformers) log-prob agreement on sampled tokens, any architecture"
    )
    p.add_argument("path", nargs="?", help="checkpoint dir (default: a fresh --builder model in a temp dir)")
    p.add_argument(
        "--builder", choices=get_args(BuilderName), default="tiny", help="architecture of the fresh model"
    )
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=1e-3, help="max abs log-prob difference allowed")
    p.set_defaults(handler=cmd_model_check)

    envs = sub.add_parser("envs", help="tool environments").add_subparsers(metavar="ACTION")
    p = envs.add_parser("list", help="registered environments: in-tree and from installed entry points")
    p.set_defaults(handler=cmd_envs_list)

    sandbox = sub.add_parser(
        "sandbox", help="the sandboxes that run model-written code: set them up, check them"
    ).add_subparsers(metavar="ACTION")
    p = sandbox.add_parser(
        "setup",
        help="make this host run the strict sandboxes (root, idempotent): apt-get install what is missing of "
        "docker.io, bubblewrap and debootstrap; start dockerd if no Docker engine answers; build the Docker "
        "image if it is missing; print which backends can run",
    )
    p.add_argument(
        "--backend",
        choices=("all", "bubblewrap"),
        default="all",
        help="'bubblewrap': only what the bubblewrap backend needs (no Docker engine, no image), e.g. for "
        "the tool demo",
    )
    p.set_defaults(handler=cmd_sandbox_setup)
    p = sandbox.add_parser(
        "build-image", help="build the Docker sandbox image (debootstrap + docker import; about a minute)"
    )
    p.add_argument("--tag", help="image tag (default: the one DockerSandbox uses, rlstack-sandbox:...)")
    p.set_defaults(handler=cmd_sandbox_build_image)
    p = sandbox.add_parser(
        "status", help="which sandbox backends this host can run, and what the others need"
    )
    p.set_defaults(handler=cmd_sandbox_status)

    p = sub.add_parser(
        "report",
        help="one self-contained HTML page of one or more runs (overlaid): training curves, off-policy "
        "health, time per stage, a rollout browser with per-token log-ratios",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--out", default="report.html", help="HTML file to write (default: report.html)")
    add_report_budgets(p)
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser(
        "dashboard", help="the report page served on 127.0.0.1, refreshing while the runs go (Ctrl-C stops)"
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: a free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)")
    p.add_argument("--refresh-s", type=float, default=5.0, help="seconds between the page's data checks")
    add_report_budgets(p)
    p.set_defaults(handler=cmd_dashboard)
    return parser
