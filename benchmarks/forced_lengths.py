"""A long-tailed response-length distribution that TRL and rlstack face equally, and a coin-flip reward.

Every completion's length is drawn in advance, not sampled from the model: the j-th completion of a prompt
(counting every time that prompt is generated for, from the start of the run) is exactly
`forced_length(prompt_ids, j)` tokens long, its last token EOS. The draw is log-normal (median MEDIAN,
sigma SIGMA, rounded, clipped to [SHORTEST, LONGEST]), seeded by a hash of the prompt's token ids and j, so
the same prompts in the same order give both frameworks the same lengths, token for token of count.
A logits processor makes each engine obey it: EOS is masked until the completion has `length - 1` tokens,
then every token but EOS is. `VllmForcedLengths` is vLLM's (V1 `LogitsProcessor`, loaded by the rollout
engine through `rollout.logits_processors`), `HfForcedLengths` is transformers' (TRL's `generate`).

A fresh model almost never answers right; with the task's own reward every group would be scored alike and
rlstack's zero-signal skip would drop the whole learner step. `coin_reward` scores a completion 0 or 1 by a
hash of its text, so nearly every group carries signal (all 8 alike: 2 / 2^8 of groups) and both sides
train on every row, as early in a real run.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.sample.logits_processor import BatchUpdate

MEDIAN = 32
SIGMA = 1.2
SHORTEST = 4
LONGEST = 384
EOS = 2  # rlstack.model.builders: the char tokenizer's EOS id


def forced_length(prompt_ids: list[int], j: int) -> int:
    """Length (tokens, EOS included) of the j-th completion of the prompt with these token ids."""
    key = hashlib.sha256(np.asarray(prompt_ids, dtype=np.int64).tobytes() + j.to_bytes(8, "little"))
    z = np.random.default_rng(int.from_bytes(key.digest()[:8], "little")).standard_normal()
    return int(min(LONGEST, max(SHORTEST, round(MEDIAN * math.exp(SIGMA * z)))))


class _Counter:
    """Hands out the lengths of each prompt's completions in the order they are started."""

    def __init__(self) -> None:
        self.started: dict[bytes, int] = {}

    def next_length(self, prompt_ids: list[int]) -> int:
        key = np.asarray(prompt_ids, dtype=np.int64).tobytes()
        j = self.started.get(key, 0)
        self.started[key] = j + 1
        return forced_length(prompt_ids, j)


def force(logits: torch.Tensor, rows: list[int], generated: list[int], lengths: list[int]) -> torch.Tensor:
    """Mask EOS in rows short of their length, everything but EOS in rows one token short.
    logits: [rows, vocab]; `rows[k]` has `generated[k]` tokens so far and must end at `lengths[k]`."""
    early = [r for r, g, n in zip(rows, generated, lengths, strict=True) if g < n - 1]
    last = [r for r, g, n in zip(rows, generated, lengths, strict=True) if g == n - 1]
    if early:
        logits[early, EOS] = -math.inf
    if last:
        eos = logits[last, EOS].clone()
        logits[last] = -math.inf
        logits[last, EOS] = eos
    return logits


class HfForcedLengths:
    """transformers logits processor for one `generate` call over left-padded prompts. Lengths come from a
    `_Counter` shared by the calls of a run, so a prompt generated for again gets its next lengths."""

    def __init__(self, counter: _Counter, pad_id: int) -> None:
        self.counter, self.pad_id = counter, pad_id
        self.prompt_len: int | None = None
        self.lengths: list[int] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # input_ids: [rows, prompt_len + generated]; scores: [rows, vocab]
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
            for row in input_ids.tolist():
                start = next((i for i, t in enumerate(row) if t != self.pad_id), len(row))
                self.lengths.append(self.counter.next_length(row[start:]))
        done = input_ids.shape[1] - self.prompt_len
        rows = list(range(len(self.lengths)))
        return force(scores, rows, [done] * len(rows), self.lengths)


def hf_generate_with_forced_lengths(model: Any, pad_id: int) -> None:
    """Make every `model.generate` call of a run obey the forced lengths (TRL calls the model's own
    `generate`, without a DeepSpeed or FSDP wrapper on CPU)."""
    from transformers import LogitsProcessorList

    counter, generate = _Counter(), model.generate

    def forced_generate(*args: Any, **kwargs: Any) -> Any:
        processors = LogitsProcessorList([HfForcedLengths(counter, pad_id)])
        return generate(*args, logits_processor=processors, **kwargs)

    model.generate = forced_generate


def _vllm_base() -> type:
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


class VllmForcedLengths(_vllm_base()):  # type: ignore[misc]
    """vLLM V1 logits processor, loaded by
    `rollout.logits_processors: ["benchmarks.forced_lengths:VllmForcedLengths"]`. A request keeps its length
    when vLLM preempts and re-adds it (keyed by its live output-token list)."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.counter = _Counter()
        self.length_of: dict[int, tuple[list[int], int]] = {}  # id(output ids) -> (output ids, length)
        self.rows: dict[int, tuple[list[int], int]] = {}  # batch row -> (live output ids, length)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for row in batch_update.removed:
            entry = self.rows.pop(row, None)
            if entry is not None and len(entry[0]) >= entry[1]:
                self.length_of.pop(id(entry[0]), None)
        for row, _params, prompt_ids, output_ids in batch_update.added:
            known = self.length_of.get(id(output_ids))
            if known is None or known[0] is not output_ids:
                known = (output_ids, self.counter.next_length(list(prompt_ids or [])))
                self.length_of[id(output_ids)] = known
            self.rows[row] = known
        for a, b, direction in batch_update.moved:
            entry_a, entry_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if entry_a is not None:
                self.rows[b] = entry_a
            if entry_b is not None and direction.name == "SWAP":
                self.rows[a] = entry_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # logits: [batch rows, vocab]
        rows = list(self.rows)
        return force(logits, rows, [len(self.rows[r][0]) for r in rows], [self.rows[r][1] for r in rows])

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        return None


def coin_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """1 or 0 by a hash of the completion's text (TRL-compatible reward function)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(hashlib.sha256(t.encode()).digest()[0] & 1) for t in texts]
