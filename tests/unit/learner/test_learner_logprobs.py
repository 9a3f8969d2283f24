"""token_logprobs scores token t with the logits at t - 1, in fp32; entropy and padding conventions; the
sampling transformation (temperature, top-k, top-p) and its -inf log-probs outside the support."""

from __future__ import annotations

import math

import pytest
import torch

from rlstack.learner.batch import PolicyBatch
from rlstack.learner.logprobs import (
    SamplingTransform,
    entropy_from_logits,
    logprobs_from_logits,
    score_tokens,
    token_logprobs,
)
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


# ---- the sampling transformation (temperature, top-k, top-p) ---------------------------------------


def _old_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The code path before SamplingTransform existed; the identity transform must reproduce it exactly."""
    logits = logits[:, :-1].float()
    logp = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.nn.functional.pad(logp, (1, 0))


def test_identity_transform_is_bit_identical(policy: Step3p5ForCausalLM, ragged_batch: PolicyBatch) -> None:
    b = ragged_batch
    with torch.no_grad():
        logits = policy(b.input_ids, attention_mask=b.attention_mask).logits  # (B, T, V)
        plain = score_tokens(policy, b.input_ids, b.attention_mask, with_routing=False)
        ident = score_tokens(
            policy, b.input_ids, b.attention_mask, with_routing=False, transform=SamplingTransform()
        )
    assert SamplingTransform().is_identity and not SamplingTransform(top_k=5).is_identity
    assert torch.equal(plain.logp, _old_logprobs(logits, b.input_ids))
    assert torch.equal(ident.logp, plain.logp) and torch.equal(ident.entropy, plain.entropy)


def test_transform_matches_hand_computed_numbers() -> None:
    # logits (2, 1, 0, -1) at T = 0.5 -> (4, 2, 0, -2); softmax (.8650, .1171, .0158, .0021).
    # top_p 0.9 keeps the smallest top set reaching 0.9: {0, 1} (0.8650 < 0.9 <= 0.9821).
    # Renormalised: log p0 = -log(1 + e^-2) = -0.126928, log p1 = -2 - log(1 + e^-2) = -2.126928,
    # entropy = 0.880797 * 0.126928 + 0.119203 * 2.126928 = 0.111798 + 0.253536 = 0.365334.
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]] * 4])  # (1, 4, V=4): same logits at every position
    ids = torch.tensor([[0, 0, 1, 2]])  # positions 1..3 score tokens 0, 1, 2
    t = SamplingTransform(temperature=0.5, top_p=0.9)
    logp = logprobs_from_logits(logits, ids, transform=t)[0]
    assert logp[0] == 0.0 and logp[3] == float("-inf")  # token 2 is outside the nucleus
    assert abs(float(logp[1]) + 0.126928) < 1e-5 and abs(float(logp[2]) + 2.126928) < 1e-5
    entropy = entropy_from_logits(logits, transform=t)[0]
    assert torch.allclose(entropy[1:], torch.full((3,), 0.365334), atol=1e-5)
    # top_k 3 at T 1: softmax over (2, 1, 0): log p(token 2) = 0 - log(e^2 + e + 1) = -2.407606
    logp_k = logprobs_from_logits(logits, ids, transform=SamplingTransform(top_k=3))[0]
    assert abs(float(logp_k[3]) + 2.407606) < 1e-5
    # top_k 1: the argmax has probability 1, every other token -inf, entropy 0
    logp_1 = logprobs_from_logits(logits, ids, transform=SamplingTransform(top_k=1))[0]
    assert logp_1.tolist() == [0.0, 0.0, float("-inf"), float("-inf")]
    assert entropy_from_logits(logits, transform=SamplingTransform(top_k=1)).abs().max() == 0.0


def test_token_outside_the_support_is_minus_inf_with_finite_gradients() -> None:
    """-inf log-probs must not poison a masked loss: the forward is finite after the mask and the backward
    through the MIS-PO loss (torch.where-masked) gives finite gradients to every logit."""
    from rlstack.mispo.losses import loss_normalizer, mispo_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 16, generator=gen).requires_grad_()  # (B, T, V)
    ids = torch.randint(0, 16, (2, 6), generator=gen)  # (B, T)
    ids[0, 3] = int(logits[0, 2].argmin())  # the least likely token: outside a top-2 support
    t = SamplingTransform(temperature=0.7, top_p=0.95, top_k=2)
    logp = logprobs_from_logits(logits, ids, transform=t)  # (B, T)
    assert logp[0, 3] == float("-inf") and not torch.isnan(logp).any()
    loss_mask = torch.zeros(2, 6, dtype=torch.bool)
    loss_mask[:, 2:] = True  # generated tokens
    trained = loss_mask & torch.isfinite(logp.detach())  # what the MIS filter does with x_t = 0
    advantages = torch.randn(2, 6, generator=gen)
    loss, _ = mispo_loss(logp, advantages, trained, loss_mask, loss_normalizer(loss_mask, "token_mean"))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0  # the in-support tokens do train
    # a ratio form: clean -inf entries with torch.where BEFORE exp(), so no 0 * inf = NaN in the backward
    logits.grad = None
    logp = logprobs_from_logits(logits, ids, transform=t)
    ok = loss_mask & torch.isfinite(logp.detach())
    ratio = torch.exp(torch.where(ok, logp, 0.0) - torch.where(ok, logp.detach(), 0.0))  # (B, T)
    torch.where(ok, ratio * advantages, 0.0).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_greedy_is_refused_and_from_sampling_reads_the_rollout_config() -> None:
    from rlstack.rollout.config import SamplingConfig

    with pytest.raises(ValueError, match="temperature 0 is greedy decoding, not a distribution"):
        SamplingTransform.from_sampling(SamplingConfig(temperature=0.0))
    with pytest.raises(ValueError, match="top_p"):
        SamplingTransform(top_p=0.0)
    t = SamplingTransform.from_sampling(SamplingConfig(temperature=0.7, top_p=0.9, top_k=20))
    assert t == SamplingTransform(temperature=0.7, top_p=0.9, top_k=20) and not t.is_identity
    assert SamplingTransform.from_sampling(SamplingConfig()).is_identity
    with pytest.raises(ValueError, match=r"raises temperatures below 0\.01"):
        SamplingConfig(temperature=0.005)


def test_top_k_at_least_the_vocab_is_off_and_chunks_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    from rlstack.learner import logprobs as module

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, 32, generator=gen)  # (B, T, V)
    ids = torch.randint(0, 32, (3, 9), generator=gen)
    assert torch.equal(
        logprobs_from_logits(logits, ids, transform=SamplingTransform(top_k=32)),
        logprobs_from_logits(logits, ids, transform=SamplingTransform(top_k=0, top_p=1.0)),
    )
    t = SamplingTransform(temperature=1.3, top_p=0.8, top_k=10)
    whole = logprobs_from_logits(logits, ids, transform=t)
    monkeypatch.setattr(module, "_SUPPORT_CHUNK_ELEMENTS", 5 * 32)  # 5 rows per chunk
    assert torch.equal(logprobs_from_logits(logits, ids, transform=t), whole)
