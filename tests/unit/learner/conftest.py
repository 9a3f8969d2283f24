"""Learner unit-test data: a tiny policy and a ragged batch with tool tokens; no Ray, no DeepSpeed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rlstack.learner.batch import PolicyBatch, collate
from rlstack.learner.config import DEFAULT_LOGPROB_CHUNK_TOKENS
from rlstack.model import Step3p5ForCausalLM
from rlstack.types import Rollout


def make_rollouts(n: int, seed: int = 0, group_size: int = 4) -> list[Rollout]:
    """n rollouts with ragged prompts/responses, a tool span in every third one, rewards in {0, 1}."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [1] + [rng.randrange(4, 128) for _ in range(rng.randrange(1, 7))]
        response = [rng.randrange(4, 128) for _ in range(rng.randrange(1, 14))]
        mask = [1] * len(response)
        if i % 3 == 2 and len(response) > 3:
            mask[1:3] = [0, 0]  # tokens inserted by a tool
        logps = [-4.8 + rng.gauss(0.0, 0.6) for _ in response]
        out.append(
            Rollout(
                prompt_id=f"p{i // group_size}", prompt_ids=prompt, response_ids=response,
                response_logprobs=logps, response_mask=mask, finish_reason="stop", version=0,
                reward=float(rng.random() < 0.5),
            )
        )  # fmt: skip
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 OpenMP threads that wait on a busy core make a
    tiny backward pass 20x slower (measured: 30 ms vs 0.5-1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _scoring_defaults():
    """A LearnerWorker set up in this process sets how every `score_tokens` packs and chunks (process-wide,
    as in its own actor process); each test starts from the library defaults."""
    from rlstack.learner import logprobs

    yield
    logprobs.set_pack_sequences(False)
    logprobs.set_logprob_chunk_tokens(DEFAULT_LOGPROB_CHUNK_TOKENS)


@pytest.fixture
def policy(tiny_checkpoint: Path) -> Step3p5ForCausalLM:
    return Step3p5ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture
def ragged_batch() -> PolicyBatch:
    return collate(make_rollouts(8), pad_id=0)
