"""Do vLLM and rlstack's PyTorch model assign the same log-probs to the same tokens?

MIS-PO's token ratio x_t = pi_old / pi_rollout is only meaningful if the learner (PyTorch) and the
rollout engine (vLLM) agree on identical weights. `check_logprob_parity` samples with vLLM, recomputes
the sampled tokens' log-probs with our model, and reports the worst disagreement.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlstack.rollout.engine import EngineSettings, close_llm, make_llm


@dataclass
class ParityReport:
    num_sequences: int
    num_tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    vllm_tokens_per_s: float
    torch_tokens_per_s: float
    sliding_window_exceeded: bool
    """Some sequence was longer than the model's sliding window (False for a model without one)."""


def synthetic_prompts(n: int, seed: int = 0) -> list[str]:
    """Arithmetic-looking chat prompts of varied length (the tiny tokenizer's alphabet)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        a, b = rng.randint(0, 10 ** rng.randint(1, 6)), rng.randint(0, 999)
        prompts.append(f"<|user|>Compute {a}{rng.choice('+-*')}{b}. Answer in \\boxed{{}}.<|assistant|>")
    return prompts


def sequence_logprobs(model: torch.nn.Module, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """log p(response_ids[i] | prompt + response[:i]) under `model`, shape (len(response_ids),)."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()  # (R, V)
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(response_ids)[:, None])[:, 0]


def check_logprob_parity(
    model_path: str | Path,
    num_prompts: int = 64,
    max_tokens: int = 32,
    settings: EngineSettings | None = None,
    seed: int = 0,
) -> ParityReport:
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    import rlstack.model  # noqa: F401  (registers Step3p5 with the Auto classes)

    llm = make_llm(model_path, settings or EngineSettings())
    try:
        params = SamplingParams(
            temperature=1.0, max_tokens=max_tokens, logprobs=0, seed=seed, ignore_eos=True
        )
        llm.generate(synthetic_prompts(4, seed + 1), params, use_tqdm=False)  # warm-up: first call is slow
        start = time.perf_counter()
        outputs = llm.generate(synthetic_prompts(num_prompts, seed), params, use_tqdm=False)
        vllm_s = time.perf_counter() - start
    finally:
        close_llm(llm)

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    diffs, longest = [], 0
    start = time.perf_counter()
    for out in outputs:
        completion = out.outputs[0]
        if completion.logprobs is None or out.prompt_token_ids is None:
            raise RuntimeError("vLLM returned a completion without log-probs or prompt token ids")
        response = list(completion.token_ids)
        # logprobs=0 returns exactly the sampled token's log-prob at each step.
        vllm_lp = torch.tensor([next(iter(step.values())).logprob for step in completion.logprobs])
        ours = sequence_logprobs(model, list(out.prompt_token_ids), response)
        diffs.append((ours - vllm_lp).abs())
        longest = max(longest, len(out.prompt_token_ids) + len(response))
    torch_s = time.perf_counter() - start
    all_diffs = torch.cat(diffs)
    return ParityReport(
        num_sequences=len(outputs),
        num_tokens=all_diffs.numel(),
        max_abs_diff=all_diffs.max().item(),
        mean_abs_diff=all_diffs.mean().item(),
        vllm_tokens_per_s=all_diffs.numel() / vllm_s,
        torch_tokens_per_s=all_diffs.numel() / torch_s,
        sliding_window_exceeded=longest > (getattr(model.config, "sliding_window", None) or longest),
    )
