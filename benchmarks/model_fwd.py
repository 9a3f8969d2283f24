"""Tokens/s of rlstack's PyTorch forward (the learner's log-prob pass) and of vLLM generate, tiny and small.

    .venv/bin/python benchmarks/model_fwd.py [--sizes tiny small] [--prompts 64] [--tokens 32]

Prints one table. Forward: batches of full sequences (prompt + response) under torch.no_grad, fp32.
vLLM: `LLM.generate` of `--prompts` prompts x `--tokens` new tokens (after one warm-up call), fp32,
in-process eager engine with a 256 MiB KV cache.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from rlstack.model import BUILDERS, Step3p5ForCausalLM, init_checkpoint
from rlstack.rollout.engine import EngineSettings, close_llm, make_llm
from rlstack.rollout.parity import synthetic_prompts


def forward_tokens_per_s(model: Step3p5ForCausalLM, batch: int, length: int, repeats: int = 3) -> float:
    ids = torch.randint(4, model.config.vocab_size, (batch, length))
    with torch.no_grad():
        model(ids[:1, :8])  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model(ids)
    return repeats * batch * length / (time.perf_counter() - start)


def vllm_tokens_per_s(path: str, prompts: int, tokens: int) -> tuple[float, float]:
    from vllm import SamplingParams

    start = time.perf_counter()
    llm = make_llm(path, EngineSettings(kv_cache_mb=256))
    init_s = time.perf_counter() - start
    try:
        params = SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=0)
        llm.generate(synthetic_prompts(4, 1), params, use_tqdm=False)
        start = time.perf_counter()
        llm.generate(synthetic_prompts(prompts), params, use_tqdm=False)
        return prompts * tokens / (time.perf_counter() - start), init_s
    finally:
        close_llm(llm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(BUILDERS))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        config = BUILDERS[size]()
        with tempfile.TemporaryDirectory() as tmp:
            init_checkpoint(config, tmp)
            model = Step3p5ForCausalLM.from_pretrained(tmp).eval()
            params = sum(p.numel() for p in model.parameters()) / 1e6
            fwd = forward_tokens_per_s(model, batch=16, length=64)
            del model
            gen, init_s = vllm_tokens_per_s(tmp, args.prompts, args.tokens)
        rows.append((size, params, fwd, gen, init_s))
    print(f"\n{'model':<8}{'params (M)':>12}{'torch fwd tok/s':>18}{'vLLM gen tok/s':>17}{'vLLM init s':>13}")
    for size, params, fwd, gen, init_s in rows:
        print(f"{size:<8}{params:>12.1f}{fwd:>18,.0f}{gen:>17,.0f}{init_s:>13.1f}")
    print(f"(forward: 16 x 64-token sequences; vLLM: {args.prompts} prompts x {args.tokens} new tokens)")


if __name__ == "__main__":
    main()
