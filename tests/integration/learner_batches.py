"""Learner test data shared by test_learner.py (Ray) and test_learner_cuda.py (no Ray): kept free of Ray
imports so the GPU tests run on a machine without it."""

from __future__ import annotations

import random

from rlstack.learner import PolicyBatch, collate
from rlstack.mispo import AlgorithmConfig, compute_advantages
from rlstack.types import Rollout

ALGO = AlgorithmConfig(name="mispo", traj_filter="off", token_band=(0.3, 3.0))  # rejects some tokens


def make_batch(n: int, seed: int) -> PolicyBatch:
    """n ragged rollouts (tool spans in some), groups of 4, rollout log-probs near a uniform policy, group
    advantages under ALGO."""
    rng = random.Random(seed)
    rollouts = []
    for i in range(n):
        prompt = [1] + [rng.randrange(4, 128) for _ in range(rng.randrange(1, 8))]
        response = [rng.randrange(4, 128) for _ in range(rng.randrange(1, 20))]
        mask = [1] * len(response)
        if i % 3 == 2 and len(response) > 3:
            mask[1:3] = [0, 0]
        rollouts.append(
            Rollout(
                prompt_id=f"p{i // 4}", prompt_ids=prompt, response_ids=response,
                response_logprobs=[-4.8 + rng.gauss(0.0, 0.6) for _ in response], response_mask=mask,
                finish_reason="stop", version=0, reward=float(rng.random() < 0.5),
            )
        )  # fmt: skip
    batch = collate(rollouts, pad_id=0)
    adv, _ = compute_advantages(ALGO, batch.rewards, batch.loss_mask, group_ids=batch.group_ids)
    return batch.replace(advantages=adv)
