"""This machine's matmul peak, and how close a learner step and vLLM generation get to it (model FLOPs, MFU).

    .venv/bin/python benchmarks/peak.py [--threads 1 2] [--sizes tiny medium] [--batch 8] [--length 512]
                                        [--seconds 1.0] [--repeats 2] [--no-vllm]

Prints three markdown tables:

- peak: `rlstack.perf.measure_peak_flops` per dtype (fp32, bf16) and thread count: the fastest square
  matmul (512 / 1024 / 2048 / 4096, as many as fit in `--seconds`) in GFLOP/s. On a CPU without native
  bf16 the bf16 kernels are much slower than fp32; the table shows what they reach.
- learner: one training step's forward + backward (no optimizer) of `--batch` x `--length` random tokens in
  plain PyTorch, fp32, the best of `--repeats` after one warm-up, per thread count: achieved model FLOP/s
  (`rlstack.perf`: 6 x active matmul parameters per token + causal attention) and MFU against the fp32 peak
  measured with the same threads. `tiny` is the ~2.7M-parameter MoE (1.4M active), `medium` the ~30M one
  (14M active per token); `small` (~100M) is available too.
- vLLM: `LLM.generate` tokens/s of the builder's checkpoint (benchmarks/model_fwd.py's `vllm_tokens_per_s`,
  64 prompts x 32 new tokens, fp32, eager, in-process), with its model FLOP/s and MFU against the fp32 peak.

OpenMP threads slow down many-fold when other processes compete for the cores: the load average is printed;
numbers measured on a busy machine are not reliable.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from rlstack.model import BUILDERS, Step3p5ForCausalLM, init_checkpoint
from rlstack.perf import FlopsPerToken, learner_flops, measure_peak_flops, mfu, model_flops_per_token

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def measured_on() -> str:
    commit = git("rev-parse", "--short", "HEAD")
    dirty = " (+ uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    cpu = platform.processor() or platform.machine()
    load = os.getloadavg()[0]
    return (
        f"measured on {datetime.date.today()}, commit {commit}{dirty}, {cpu}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, 1-min load average {load:.1f}"
    )


def train_step_seconds(model: torch.nn.Module, batch: int, length: int, repeats: int) -> float:
    """Best wall-clock seconds of forward + backward (next-token cross-entropy) on random tokens."""
    ids = torch.randint(4, model.config.vocab_size, (batch, length))
    model.train()
    best = float("inf")
    for i in range(repeats + 1):  # the first one warms up
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        if i > 0:
            best = min(best, time.perf_counter() - start)
    return best


def rollout_context(prompts: int, tokens: int) -> float:
    """Mean attended keys of a generated token: mean prompt length + (tokens + 1) / 2."""
    from rlstack.model.tokenizer import build_tokenizer
    from rlstack.rollout.parity import synthetic_prompts

    tokenizer = build_tokenizer()
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in synthetic_prompts(prompts)]
    return sum(lengths) / len(lengths) + (tokens + 1) / 2


def vllm_rows(
    size: str, fpt: FlopsPerToken, threads: list[int], peaks: dict[int, float], prompts: int, tokens: int
) -> list[str]:
    from model_fwd import vllm_tokens_per_s  # benchmarks/ is the script's directory

    context = rollout_context(prompts, tokens)
    rows = []
    with tempfile.TemporaryDirectory() as path:
        init_checkpoint(BUILDERS[size](), path)
        for t in threads:
            torch.set_num_threads(t)  # the in-process engine keeps the process's setting
            rate, init_s = vllm_tokens_per_s(path, prompts, tokens)
            achieved = rate * fpt.forward(context)
            util = mfu(achieved, 1.0, peaks[t])
            rows.append(
                f"| {size} | {t} | {rate:,.0f} | {achieved / 1e9:.2f} | {100 * util:.2f}% | {init_s:.1f} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=list(BUILDERS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="timed learner steps (best counts)")
    parser.add_argument("--seconds", type=float, default=1.0, help="per peak measurement")
    parser.add_argument("--matmul-sizes", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM generation rows")
    args = parser.parse_args()
    initial_threads = torch.get_num_threads()

    print(f"\n{measured_on()}\n")
    print("| dtype | threads | matmul peak GFLOP/s |")
    print("|---|---|---|")
    fp32: dict[int, float] = {}
    for name, dtype in DTYPES.items():
        for t in args.threads:
            peak = measure_peak_flops(dtype, t, args.seconds, args.matmul_sizes)
            fp32 |= {t: peak} if name == "fp32" else {}
            print(f"| {name} | {t} | {peak / 1e9:,.1f} |", flush=True)

    shape = f"{args.batch} x {args.length} tokens"
    print(f"\nLearner step: forward + backward of {shape}, fp32, best of {args.repeats}\n")
    print("| model | active matmul params (M) | threads | step s | model GFLOP/s | MFU (fp32 peak) |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        torch.manual_seed(0)
        config = BUILDERS[size]()
        fpt = model_flops_per_token(config)
        model = Step3p5ForCausalLM(config).float()
        flops = learner_flops(fpt, [args.length] * args.batch)
        for t in args.threads:
            torch.set_num_threads(t)
            seconds = train_step_seconds(model, args.batch, args.length, args.repeats)
            rate, util = flops / seconds, mfu(flops, seconds, fp32[t])
            row = f"| {size} | {fpt.matmul_params / 1e6:.1f} | {t} | {seconds:.2f} | {rate / 1e9:.2f} |"
            print(f"{row} {100 * util:.1f}% |", flush=True)
        del model
    torch.set_num_threads(initial_threads)

    if not args.no_vllm:  # vLLM logs as it starts: its table comes after
        vllm = []
        for size in args.sizes:
            fpt = model_flops_per_token(BUILDERS[size]())
            vllm += vllm_rows(size, fpt, args.threads, fp32, args.prompts, args.tokens)
        torch.set_num_threads(initial_threads)
        print(
            f"\nvLLM generate: {args.prompts} prompts x {args.tokens} new tokens, fp32, eager, in-process\n"
        )
        print("| model | threads | tokens/s | model GFLOP/s | MFU (fp32 peak) | engine init s |")
        print("|---|---|---|---|---|---|")
        print("\n".join(vllm))
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) + 1:
        print(
            f"\nWARNING: load average {load:.1f} on {os.cpu_count()} cores: other work competed; not reliable"
        )


if __name__ == "__main__":
    main()
