"""What packing, the zero-signal skip and a token budget save in one learner step, on long-tailed lengths.

    .venv/bin/python benchmarks/learner_step.py [--size tiny] [--rows 64] [--micro 16] [--zero-signal 0.5]
                                               [--max-tokens 512] [--budget 2048] [--threads 2] [--repeats 3]

One policy mini-batch (forward + backward through `rlstack.learner.step.accumulate_minibatch`, plain PyTorch,
fp32, the separate-pi_old path) on `--rows` rollouts in groups of 8: prompts of 8-24 tokens, response lengths
drawn from a log-normal (median `--max-tokens`/8, clipped at `--max-tokens`: most short, a few long, as in
the Step 3.5 report's long tail), and a `--zero-signal` share of the groups scored alike (advantage 0).
Prints a markdown table: seconds per step (best of `--repeats` after a warm-up), real tokens/s, and the
speed-up over padding every micro-batch to its longest row with no skip, for each of padded / packed x
skip off / on, and packed + skip with micro-batches cut by a token budget (`--budget` real tokens,
`learner.micro_batch_tokens`) instead of `--micro` rows. OpenMP threads slow down many-fold when other
processes compete for the cores: run it on an idle machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

import torch

from rlstack.learner.batch import PolicyBatch, collate
from rlstack.learner.micro import MicroSplit
from rlstack.learner.step import LocalReducer, TorchSink, accumulate_minibatch
from rlstack.mispo import AlgorithmConfig, compute_advantages
from rlstack.model import BUILDERS, Step3p5ForCausalLM
from rlstack.types import Rollout

GROUP = 8
ALGO = AlgorithmConfig(name="mispo", traj_filter="off", token_band=(0.5, 2.0))


def long_tailed_batch(rows: int, max_tokens: int, zero_signal: float, vocab: int, seed: int) -> PolicyBatch:
    """Rollouts with log-normal response lengths; `zero_signal` of the groups get one reward for all."""
    rng = random.Random(seed)
    rollouts = []
    for i in range(rows):
        group = i // GROUP
        constant = group < round(zero_signal * rows / GROUP)
        n = min(max_tokens, max(1, round(rng.lognormvariate(math.log(max_tokens / 8), 1.0))))
        rollouts.append(
            Rollout(
                prompt_id=f"p{group}",
                prompt_ids=[1] + [rng.randrange(4, vocab) for _ in range(rng.randrange(8, 24))],
                response_ids=[rng.randrange(4, vocab) for _ in range(n)],
                response_logprobs=[-5.0] * n,
                response_mask=[1] * n,
                finish_reason="stop",
                version=0,
                reward=1.0 if constant else float(rng.random() < 0.5),
            )
        )
    batch = collate(rollouts, pad_id=0)
    adv, _ = compute_advantages(ALGO, batch.rewards, batch.loss_mask, group_ids=batch.group_ids)
    return batch.replace(advantages=adv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(BUILDERS))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--zero-signal", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--budget", type=int, default=2048, help="tokens per micro-batch of the last row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from rlstack.learner import logprobs

    config = BUILDERS[args.size]()
    model = Step3p5ForCausalLM(config).float()
    batch = long_tailed_batch(args.rows, args.max_tokens, args.zero_signal, config.vocab_size, seed=0)
    with torch.no_grad():
        old = logprobs.score_tokens(model, batch.input_ids, batch.attention_mask, with_entropy=False).logp
    batch = batch.replace(old_logp=old * batch.loss_mask, rollout_logp=old * batch.loss_mask)
    real = int(batch.attention_mask.sum())
    lengths = batch.attention_mask.sum(-1).float()
    print(f"load average {os.getloadavg()[0]:.2f}; {args.size}, {args.rows} rows, micro-batches of "
          f"{args.micro}, {args.threads} threads; sequence length median {lengths.median():.0f}, "
          f"max {lengths.max():.0f}; {real} real tokens; {args.zero_signal:.0%} of groups without "
          "signal\n")  # fmt: skip
    print("| forward | skip | micro-batches | s/step | real tokens/s | speed-up |")
    print("|---|---|---|---|---|---|")
    rows, budget = MicroSplit(rows=args.micro), MicroSplit(rows=args.micro, tokens=args.budget)
    cases = [(False, False, rows), (False, True, rows), (True, False, rows), (True, True, rows)]
    base = None
    for packed, skip, split in [*cases, (True, True, budget)]:
        logprobs.set_pack_sequences(packed)
        seconds = _timed(model, batch, split, args.repeats, skip)
        base = base or seconds
        cut = f"{split.tokens} tokens" if split.tokens else f"{split.rows} rows"
        print(f"| {'packed' if packed else 'padded'} | {'on' if skip else 'off'} | {cut} | {seconds:.2f} | "
              f"{real / seconds:,.0f} | {base / seconds:.2f}x |")  # fmt: skip
    logprobs.set_pack_sequences(False)


def _timed(
    model: Step3p5ForCausalLM, batch: PolicyBatch, micro: MicroSplit, repeats: int, skip: bool
) -> float:
    """Best seconds of `repeats` mini-batch forward/backward passes after one warm-up."""
    best = math.inf
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        accumulate_minibatch(model, batch, ALGO, TorchSink(), LocalReducer(), micro, skip_zero_signal=skip)
        if i:
            best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    main()
