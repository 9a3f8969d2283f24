"""`rlstack` command line. Each subcommand parses its config before importing torch/vLLM, so user
mistakes fail fast with a one-line message (exit 2) instead of a traceback."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any, get_args

from rlstack.config import (
    BuilderName,
    ConfigError,
    RunConfig,
    check_resume_config,
    dump_config,
    load_config,
)


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


def add_report_budgets(p: argparse.ArgumentParser) -> None:
    from rlstack.monitor.report.data import MAX_ROLLOUTS, MAX_TOKENS

    p.add_argument(
        "--max-tokens",
        type=int,
        default=MAX_TOKENS,
        help=f"per-token samples to include, in tokens (default {MAX_TOKENS:,}; steps spread over the run)",
    )
    p.add_argument(
        "--max-rollouts",
        type=int,
        default=MAX_ROLLOUTS,
        help=f"rollout records to include (default {MAX_ROLLOUTS:,}; steps spread over the run)",
    )


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


def cmd_model_init(args: argparse.Namespace) -> int:
    from rlstack.model import BUILDERS, init_checkpoint

    path = init_checkpoint(BUILDERS[args.builder](), args.path, seed=args.seed)
    print(f"wrote a fresh {args.builder} checkpoint to {path}")
    return 0


def cmd_model_check(args: argparse.Namespace) -> int:
    import tempfile

    from rlstack.model import BUILDERS, init_checkpoint
    from rlstack.model.auto import check_architecture
    from rlstack.rollout.parity import check_logprob_parity

    with tempfile.TemporaryDirectory(prefix="rlstack-check-") as tmp:
        path = args.path
        if path is None:
            config = BUILDERS[args.builder]()
            config.initializer_range = 0.2  # peaked distributions make disagreements visible
            path = init_checkpoint(config, tmp)
        arch = check_architecture(path)
        report = check_logprob_parity(path, args.prompts, args.tokens)
    ok = report.max_abs_diff <= args.tolerance
    print(f"\n{'architecture':<32}{arch}")
    print(f"{'sequences':<32}{report.num_sequences}")
    print(f"{'tokens compared':<32}{report.num_tokens}")
    print(f"{'max |logp_vllm - logp_torch|':<32}{report.max_abs_diff:.3g}  (tolerance {args.tolerance:g})")
    print(f"{'mean |diff|':<32}{report.mean_abs_diff:.3g}")
    print(f"{'past the sliding window':<32}{report.sliding_window_exceeded}")
    print(f"{'vLLM generate tokens/s':<32}{report.vllm_tokens_per_s:,.0f}")
    print(f"{'PyTorch forward tokens/s':<32}{report.torch_tokens_per_s:,.0f}")
    print("OK: vLLM and PyTorch agree" if ok else "FAIL: vLLM and PyTorch disagree")
    return 0 if ok else 1


def cmd_sandbox_setup(args: argparse.Namespace) -> int:
    import time

    from rlstack.envs.host_setup import (
        BUBBLEWRAP_PACKAGES,
        DOCKERD_PIDFILE,
        install_host_packages,
        start_engine,
    )
    from rlstack.envs.image import build_image, default_image, image_present
    from rlstack.envs.sandbox import SandboxError

    start = time.monotonic()
    only_bubblewrap = args.backend == "bubblewrap"
    try:
        installed = install_host_packages(packages=BUBBLEWRAP_PACKAGES if only_bubblewrap else None)
        print(f"installed {', '.join(installed)}" if installed else "packages: all installed already")
        if only_bubblewrap:
            print(f"sandbox setup (bubblewrap) done in {time.monotonic() - start:.0f} s")
            return 0 if print_sandbox_table().get("bubblewrap", "?") is None else 1
        pid = start_engine()
        print(
            f"started dockerd, pid {pid} (in {DOCKERD_PIDFILE})" if pid else "Docker engine: running already"
        )
        if image_present(default_image()):
            print(f"image {default_image()}: present already")
        else:
            build_image()
    except SandboxError as e:
        print(f"error: {e}", file=sys.stderr)
        print_sandbox_table()
        return 1
    print(f"sandbox setup done in {time.monotonic() - start:.0f} s")
    table = print_sandbox_table()
    return 0 if table.get("docker", "?") is None and table.get("bubblewrap", "?") is None else 1


def cmd_sandbox_build_image(args: argparse.Namespace) -> int:
    from rlstack.envs.image import build_image
    from rlstack.envs.sandbox import SandboxError

    try:
        print(f"built {build_image(args.tag)}")
    except SandboxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_sandbox_status(args: argparse.Namespace) -> int:
    print_sandbox_table()
    return 0


def print_sandbox_table() -> dict[str, str | None]:
    """Print each built-in backend: strict or not, and ready or what it needs; return backend -> missing."""
    from rlstack.envs.backends import backend_class, host_backends

    try:
        missing = host_backends()
    except Exception:  # one backend does not even import: say so in its row, check the others
        missing = {}
        for name in ("docker", "bubblewrap", "process"):
            try:
                missing[name] = backend_class(name).unavailable()
            except Exception as e:
                missing[name] = f"{type(e).__name__}: {e}"
    print(f"\n{'backend':<12}{'strict':<8}status")
    for name, reason in missing.items():
        try:
            strict = "yes" if backend_class(name).strict else "no"
        except Exception:
            strict = "?"
        print(f"{name:<12}{strict:<8}{'ready' if reason is None else reason}")
    return missing


def cmd_report(args: argparse.Namespace) -> int:
    from rlstack.monitor.report import ReportError, write_report

    try:
        path = write_report(args.run_dirs, args.out, args.max_tokens, args.max_rollouts)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from rlstack.monitor.report import DashboardServer, ReportError

    try:
        server = DashboardServer(
            args.run_dirs, args.host, args.port, args.refresh_s, args.max_tokens, args.max_rollouts
        )
    except (ReportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"dashboard of {', '.join(args.run_dirs)}: {server.url}  (Ctrl-C stops it)", flush=True)
    server.start().wait()
    print("dashboard stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
