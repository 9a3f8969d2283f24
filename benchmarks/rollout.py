"""Rollout throughput: `RolloutGroup` (vLLM inside a Ray actor) vs vLLM called directly in this process.

    .venv/bin/python benchmarks/rollout.py [--size tiny] [--prompts 64] [--n 8] [--tokens 32]

Same checkpoint, prompts and sampling; each side gets one warm-up call, then the best of `--repeats`
timed calls. Goal (issue 5): RolloutGroup >= 0.8 x direct.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray

from rlstack.model import BUILDERS, init_checkpoint
from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.engine import EngineSettings, close_llm, make_llm
from rlstack.rollout.group import RolloutGroup
from rlstack.rollout.parity import synthetic_prompts
from rlstack.rollout.worker import Prompt


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=list(BUILDERS))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sampling = SamplingConfig(n=args.n, max_tokens=args.tokens)
    config = RolloutConfig(sampling=sampling, kv_cache_mb=512, cpus_per_worker=2)
    texts = synthetic_prompts(args.prompts)
    prompts = [Prompt(str(i), text=t) for i, t in enumerate(texts)]
    tokens = args.prompts * args.n * args.tokens

    with tempfile.TemporaryDirectory() as path:
        init_checkpoint(BUILDERS[args.size](), path)
        from vllm import SamplingParams

        llm = make_llm(path, EngineSettings(kv_cache_mb=config.kv_cache_mb))
        params = SamplingParams(n=args.n, max_tokens=args.tokens, ignore_eos=True, logprobs=0, seed=0)
        llm.generate(texts[:4], params, use_tqdm=False)
        direct = best_of(args.repeats, lambda: llm.generate(texts, params, use_tqdm=False))
        close_llm(llm)

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        group = RolloutGroup(path, config)
        group.generate(prompts[:4])
        fixed_len = sampling.model_copy(update={"seed": 0})
        # ignore_eos is not a policy setting; equal lengths come from a model that rarely emits EOS
        grouped = best_of(args.repeats, lambda: group.generate(prompts, fixed_len))
        produced = sum(len(r.response_ids) for r in group.generate(prompts, fixed_len))
        group.shutdown()
        ray.shutdown()

    print(f"\n{'path':<34}{'seconds':>9}{'tokens/s':>11}")
    print(f"{'vLLM direct (in-process)':<34}{direct:>9.2f}{tokens / direct:>11,.0f}")
    grouped_rate = produced / grouped
    print(f"{'RolloutGroup (1 Ray actor)':<34}{grouped:>9.2f}{grouped_rate:>11,.0f}")
    print(f"ratio RolloutGroup / direct: {grouped_rate / (tokens / direct):.2f}  (goal >= 0.8)")
    print(f"({args.size}, {args.prompts} prompts x n={args.n} x {args.tokens} tokens)")


if __name__ == "__main__":
    main()
