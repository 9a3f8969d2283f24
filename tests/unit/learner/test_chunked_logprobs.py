"""Chunked scoring (`score_tokens(chunk_tokens=...)`, `learner.logprob_chunk_tokens`): the output head and the
log-softmax run chunk by chunk along the sequence under activation checkpointing. Log-probs, entropies and
parameter gradients equal the unchunked path's; the forward keeps no (tokens, V) logits for the backward,
also on 4k-token responses; models that transform their logits after the head are reproduced or refused."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from rlstack.learner import logprobs
from rlstack.learner.config import DEFAULT_LOGPROB_CHUNK_TOKENS, LearnerConfig, LoRAConfig
from rlstack.learner.logprobs import SamplingTransform, TokenScores, score_tokens
from rlstack.model import Step3p5ForCausalLM, tiny

TOL = {"rtol": 1e-5, "atol": 1e-5}
SAMPLING = SamplingTransform(temperature=0.7, top_k=20, top_p=0.9)


def _batch(B: int = 3, T: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and a right-padded attention mask (rows of T, T - 10 and 17 real tokens; B <= 3)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, T), generator=g)
    attn = torch.ones_like(ids)
    attn[1:, T - 10 :] = 0
    attn[2:, 17:] = 0
    return ids.masked_fill(attn == 0, 0), attn


def _run(
    model: Any, ids: torch.Tensor, attn: torch.Tensor, chunk: int, **kwargs: Any
) -> tuple[TokenScores, dict[str, torch.Tensor]]:
    """Score, backpropagate the masked sum of finite log-probs; the scores and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    scores = score_tokens(model, ids, attn, chunk_tokens=chunk, **kwargs)
    keep = attn.bool() & torch.isfinite(scores.logp)  # (B, T): -inf outside a top-k/top-p support
    torch.where(keep, scores.logp, 0.0).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return scores, grads


def _assert_same(a: tuple[TokenScores, dict], b: tuple[TokenScores, dict]) -> None:
    (sa, ga), (sb, gb) = a, b
    torch.testing.assert_close(sb.logp, sa.logp, **TOL)  # -inf at the same places (equal_nan-free check)
    assert sa.entropy is not None and sb.entropy is not None
    torch.testing.assert_close(sb.entropy, sa.entropy, **TOL)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], **TOL, msg=name)


def _count_head_calls(head: nn.Module) -> tuple[list[int], Callable[[], None]]:
    calls = [0]

    def hook(module: nn.Module, args: Any) -> None:
        calls[0] += 1

    handle = head.register_forward_pre_hook(hook)
    return calls, handle.remove


@pytest.mark.parametrize("transform", [None, SAMPLING], ids=["policy", "sampling"])
def test_chunked_equals_unchunked_with_grads(policy: Step3p5ForCausalLM, transform) -> None:
    ids, attn = _batch()  # 3 x 49 scored positions; 36 // 3 = 12 per chunk: 5 chunks, the last of 1
    whole = _run(policy, ids, attn, 0, transform=transform)
    calls, remove = _count_head_calls(policy.lm_head)
    chunked = _run(policy, ids, attn, 36, transform=transform)
    remove()
    assert calls[0] == 1 + 5 + 5  # the capture, 5 chunks, 5 recomputed in the backward pass
    _assert_same(whole, chunked)
    s, w = chunked[0], whole[0]
    assert s.entropy is not None and not s.entropy.requires_grad
    assert float(s.logp[:, 0].detach().abs().max()) == 0.0 and float(s.entropy[:, 0].abs().max()) == 0.0
    if transform is not None:
        assert bool(torch.isinf(w.logp).any())  # tokens outside the top-k/top-p support: -inf in both
    assert s.routing_confidence is not None and torch.equal(s.routing_confidence, w.routing_confidence)
    assert s.expert_ids is not None and torch.equal(s.expert_ids, w.expert_ids)


def test_chunked_without_grad_and_without_entropy(policy: Step3p5ForCausalLM) -> None:
    ids, attn = _batch()
    with torch.no_grad():
        whole = score_tokens(policy, ids, attn, chunk_tokens=0, with_routing=False)
        chunked = score_tokens(policy, ids, attn, chunk_tokens=7, with_routing=False, with_entropy=False)
    torch.testing.assert_close(chunked.logp, whole.logp, **TOL)
    assert chunked.entropy is None and chunked.routing_confidence is None


def test_short_micro_batches_and_the_process_default(policy: Step3p5ForCausalLM) -> None:
    assert (
        LearnerConfig().logprob_chunk_tokens
        == DEFAULT_LOGPROB_CHUNK_TOKENS
        == logprobs.logprob_chunk_tokens()
    )
    ids, attn = _batch(B=2, T=11)  # 20 scored positions
    calls, remove = _count_head_calls(policy.lm_head)
    try:
        with torch.no_grad():
            plain = score_tokens(policy, ids, attn, chunk_tokens=20).logp  # not above the chunk: unchunked
            assert calls[0] == 1
            logprobs.set_logprob_chunk_tokens(4)  # what the worker does with learner.logprob_chunk_tokens
            chunked = score_tokens(policy, ids, attn).logp
            assert calls[0] == 1 + 1 + 5  # capture + 10 positions / 2 per chunk
    finally:
        logprobs.set_logprob_chunk_tokens(DEFAULT_LOGPROB_CHUNK_TOKENS)
        remove()
    torch.testing.assert_close(chunked, plain, **TOL)
    with pytest.raises(ValueError, match=">= 0"):
        logprobs.set_logprob_chunk_tokens(-1)
    with pytest.raises(ValueError):
        LearnerConfig(logprob_chunk_tokens=-1)


def test_lora_policy_with_an_adapted_head(policy: Step3p5ForCausalLM) -> None:
    """PEFT wraps the model and here the LM head itself: the head called per chunk is the adapted one."""
    from rlstack.learner.lora import apply_lora

    model = apply_lora(policy, LoRAConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():  # B = 0 at start: make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    ids, attn = _batch()
    whole = _run(model, ids, attn, 0)
    chunked = _run(model, ids, attn, 30)
    assert any("lm_head" in name for name in whole[1])  # the head's adapter has a gradient
    _assert_same(whole, chunked)


def _hf_model(kind: str) -> nn.Module:
    """A 1-layer transformers causal LM of an architecture that transforms its logits after the head."""
    import transformers

    common = {
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "pad_token_id": 0,
        "tie_word_embeddings": False,
    }  # fmt: skip
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),  # nothing after the head
        "gemma2": lambda: transformers.Gemma2Config(**common, final_logit_softcapping=3.0),  # soft-cap
        "cohere": lambda: transformers.CohereConfig(**common, logit_scale=0.5),  # logits * scale
        "granite": lambda: transformers.GraniteConfig(**common, logits_scaling=4.0),  # logits / scaling
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[kind](), dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5)  # peaked logits: a missed transform moves them by nats
    return model


@pytest.mark.parametrize("kind", ["llama", "gemma2", "cohere", "granite"])
def test_any_model_logit_transforms(kind: str) -> None:
    model = _hf_model(kind)
    ids, attn = _batch(T=30)
    whole = _run(model, ids, attn, 0, with_routing=False, transform=SAMPLING)
    chunked = _run(model, ids, attn, 20, with_routing=False, transform=SAMPLING)
    _assert_same(whole, chunked)


def test_an_unknown_logit_transform_is_refused() -> None:
    class Doubled(nn.Module):
        """Multiplies the logits by 2 after the head, with nothing in its config saying so."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = _hf_model("llama")

        def get_output_embeddings(self) -> nn.Module:
            return self.inner.lm_head

        def forward(self, **kwargs: Any) -> SimpleNamespace:
            return SimpleNamespace(logits=self.inner(**kwargs).logits * 2)

    ids, attn = _batch(T=30)
    with pytest.raises(RuntimeError, match="transforms its logits after the output head"):
        score_tokens(Doubled(), ids, attn, with_routing=False, chunk_tokens=20)
    score_tokens(Doubled(), ids, attn, with_routing=False, chunk_tokens=0)  # unchunked: fine


# ---- 4k-token responses: what the forward keeps for the backward pass -------------------------------------


def _saved_bytes(model: Step3p5ForCausalLM, ids: torch.Tensor, chunk: int) -> tuple[int, int, TokenScores]:
    """Bytes of the distinct tensors (parameters excluded) that autograd keeps for the backward pass: (all of
    them, those first saved once the output head has started, less the head's input: the (B, T, H) hidden
    state both paths keep)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    head_phase: dict[int, int] = {}
    head_input: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen[key] = storage.nbytes()
            if head_input and key not in head_input:
                head_phase[key] = storage.nbytes()
        return t

    def on_head(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        head_input.add(args[0].untyped_storage().data_ptr())

    handle = model.lm_head.register_forward_pre_hook(on_head)
    try:
        with saved_tensors_hooks(pack, lambda t: t):
            scores = score_tokens(model, ids, torch.ones_like(ids), chunk_tokens=chunk, with_routing=False)
    finally:
        handle.remove()
    return sum(seen.values()), sum(head_phase.values()), scores


def test_4k_token_response_keeps_no_logits_for_the_backward() -> None:
    """1 row: an 8-token prompt and a 4096-token response on the tiny MoE model (4 layers, V = 128, sliding
    window 32; RoPE positions are computed, so 4k+ positions work though tiny() says 2048). The model body
    is frozen to keep the test fast: what is measured is what the output head and log-softmax keep."""
    config = tiny()
    config.max_position_embeddings = config.max_seq_len = 8192
    torch.manual_seed(0)
    model = Step3p5ForCausalLM(config)
    model.model.requires_grad_(False)
    T, V = 8 + 4096, config.vocab_size
    ids = torch.randint(3, V, (1, T))
    logits_bytes = 1 * (T - 1) * V * 4  # the fp32 (B, T - 1, V) logits

    total_whole, head_whole, whole = _saved_bytes(model, ids, chunk=0)
    total_chunked, head_chunked, chunked = _saved_bytes(model, ids, chunk=1000)  # 5 chunks, the last of 103
    # measured: unchunked 5.30 MB (2.15 MB after the head's input), chunked 3.18 MB (32.8 kB); logits 2.10 MB
    assert head_whole >= logits_bytes  # unchunked: the logits (and more) wait for the backward
    assert head_chunked <= ids.numel() * ids.element_size()  # chunked: only the ids the chunks recompute with
    assert total_whole - total_chunked >= logits_bytes
    whole.logp.sum().backward()
    expected = model.lm_head.weight.grad.clone()
    model.zero_grad()
    chunked.logp.sum().backward()  # each chunk's logits recomputed
    torch.testing.assert_close(chunked.logp, whole.logp, **TOL)
    torch.testing.assert_close(model.lm_head.weight.grad, expected, **TOL)
