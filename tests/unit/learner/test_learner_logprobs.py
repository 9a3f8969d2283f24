"""token_logprobs scores token t with the logits at t - 1, in fp32; entropy and padding conventions."""

from __future__ import annotations

import math

import torch

from rlstack.learner.batch import PolicyBatch
from rlstack.learner.logprobs import score_tokens, token_logprobs
from rlstack.model import Step3p5ForCausalLM


def test_token_logprobs_equal_a_hand_loop(policy: Step3p5ForCausalLM, ragged_batch: PolicyBatch) -> None:
    b = ragged_batch
    with torch.no_grad():
        logp, entropy = token_logprobs(policy, b.input_ids, b.attention_mask, return_entropy=True)
    assert logp.shape == entropy.shape == b.input_ids.shape
    assert logp.dtype == torch.float32
    for row in range(len(b)):
        n = int(b.attention_mask[row].sum())
        ids = b.input_ids[row, :n]
        with torch.no_grad():
            logits = policy(ids[None]).logits[0].double()  # (n, V), unpadded: padding must not matter
        assert logp[row, 0] == 0.0 and entropy[row, 0] == 0.0  # no context for the first token
        for t in range(1, n):
            probs = torch.softmax(logits[t - 1], -1)
            expected = math.log(float(probs[ids[t]]))
            assert abs(float(logp[row, t]) - expected) < 1e-5, (row, t)
            expected_h = -float((probs * probs.log()).sum())
            assert abs(float(entropy[row, t]) - expected_h) < 1e-5, (row, t)


def test_score_tokens_keeps_grad_and_reports_routing(policy: Step3p5ForCausalLM, ragged_batch) -> None:
    b = ragged_batch
    scores = score_tokens(policy, b.input_ids, b.attention_mask)
    assert scores.logp.requires_grad
    assert scores.entropy is not None and not scores.entropy.requires_grad
    conf = scores.routing_confidence
    assert conf is not None and conf.shape == b.input_ids.shape
    assert bool(((conf > 0) & (conf <= 1)).all())  # top-2 of 8 sigmoid scores: a fraction of the mass
