"""Per-token log-probs (and entropy, routing confidence) of a causal LM, in the `PolicyBatch` convention:
the value at position t scores token t given tokens < t; position 0 has no context and holds 0.
Everything is computed in fp32 whatever the model's dtype (bf16 log-probs are off by whole nats).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class TokenScores:
    """One forward pass, scored. All (B, T), position t scoring token t; position 0 is 0."""

    logp: torch.Tensor  # log p(token_t | < t), with grad if the forward had grad
    entropy: torch.Tensor | None  # entropy of the distribution token t was drawn from, detached
    routing_confidence: torch.Tensor | None  # MoE: mass of the chosen experts at position t, detached


def logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) ids -> (B, T) log p(ids[:, t] | < t); column 0 is 0."""
    logits = logits[:, :-1].float()  # (B, T-1, V): logits at t-1 predict token t
    target = input_ids[:, 1:, None]  # (B, T-1, 1)
    logp = logits.gather(-1, target).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, T-1)
    return torch.nn.functional.pad(logp, (1, 0))  # (B, T)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy of the next-token distribution that produced token t; column 0 is 0."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, T-1)
    return torch.nn.functional.pad(entropy, (1, 0))  # (B, T)


def score_tokens(
    model: Callable[..., object],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    with_entropy: bool = True,
    with_routing: bool = True,
) -> TokenScores:
    """Forward `model` (an HF causal LM or a DeepSpeed engine wrapping one) and score every position.

    input_ids, attention_mask (B, T). Routing confidence needs a model that accepts `output_router_stats`
    (our Step3p5); it is None for other models or when `with_routing` is False.
    """
    kwargs = {"output_router_stats": True} if with_routing else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    logits = out.logits  # type: ignore[attr-defined]  # (B, T, V)
    routing = getattr(out, "routing_confidence", None) if with_routing else None
    return TokenScores(
        logp=logprobs_from_logits(logits, input_ids),
        entropy=entropy_from_logits(logits.detach()) if with_entropy else None,
        routing_confidence=None if routing is None else routing.detach().float(),
    )


def token_logprobs(
    model: Callable[..., object],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, L) log p(input_ids[:, t] | input_ids[:, :t]), position 0 = 0; with `return_entropy`, also the
    (B, L) entropy of each position's next-token distribution. Gradient flows if enabled by the caller."""
    scores = score_tokens(model, input_ids, attention_mask, with_entropy=return_entropy, with_routing=False)
    if return_entropy:
        assert scores.entropy is not None
        return scores.logp, scores.entropy
    return scores.logp
