"""Per-token log-probs (and entropy, routing confidence) of a causal LM, in the `PolicyBatch` convention:
the value at position t scores token t given tokens < t; position 0 has no context and holds 0.
Everything is computed in fp32 whatever the model's dtype (bf16 log-probs are off by whole nats).

With a `SamplingTransform` the log-probs are those of the distribution the rollout engine sampled from
(temperature, then top-k / top-p, renormalised), which is what vLLM records with
`logprobs_mode="processed_logprobs"` (rlstack.rollout.engine): every ratio (MIS-PO's x_t, PPO/GSPO, KL)
then compares two versions of one distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Rows of a (rows, V) logits block whose support is computed at once: bounds the sort's scratch (values
# and int64 indices) to a few hundred MB for large vocabularies.
_SUPPORT_CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class SamplingTransform:
    """The sampling distribution of the rollout engine, in vLLM's order: logits / temperature, keep the
    `top_k` largest (ties at the k-th value kept; 0 = off), then keep the smallest set of most likely tokens
    whose mass reaches `top_p` (at least one token), renormalise.

    The support (which tokens survive top-k / top-p) is recomputed in every forward pass from the LEARNER's
    own logits, not read from the rollout. Recording the engine's mask would cost a vocab-sized bit set per
    generated token; with the learner's own support pi_old and pi_theta are proper distributions of the
    learner (sum to 1, differentiable in the logits of the kept tokens), and where the learner's and the
    engine's supports differ (a token near the top-p boundary), x_t = pi_old / pi_rollout shows it and the
    MIS token filter rejects the token. A sampled token outside the learner's support gets log-prob -inf
    (its gradient w.r.t. the logits is finite: 0 through the masked entry); losses must mask such positions
    with `torch.where` before any exp() or subtraction of two -inf (mispo.losses cleans with the loss mask).

    Temperature 0 (greedy) is not a distribution and is refused. vLLM raises temperatures in (0, 0.01) to
    0.01; rollout.config.SamplingConfig refuses those, so the two stay equal.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0.0 or self.temperature == float("inf"):
            raise ValueError(
                f"sampling temperature {self.temperature}: temperature 0 is greedy decoding, not a "
                "distribution, so the learner cannot score its tokens; sample the rollouts with a "
                "temperature > 0 (rollout.sampling.temperature)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling top_p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"sampling top_k {self.top_k}: must be >= 0 (0 = off)")

    @property
    def is_identity(self) -> bool:
        """True when the sampling distribution is the policy itself (temperature 1, no top-k/top-p)."""
        return self.temperature == 1.0 and self.top_p == 1.0 and self.top_k == 0

    @classmethod
    def from_sampling(cls, sampling: Any) -> SamplingTransform:
        """From anything with `temperature`, `top_p` and optional `top_k` (rollout.config.SamplingConfig)."""
        return cls(
            temperature=float(sampling.temperature),
            top_p=float(sampling.top_p),
            top_k=int(getattr(sampling, "top_k", 0) or 0),
        )


@dataclass
class TokenScores:
    """One forward pass, scored. All (B, T), position t scoring token t; position 0 is 0."""

    logp: torch.Tensor  # log p(token_t | < t), with grad if the forward had grad
    entropy: torch.Tensor | None  # entropy of the distribution token t was drawn from, detached
    routing_confidence: torch.Tensor | None  # MoE: mass of the chosen experts at position t, detached
    router_stats: list[Any] | None = None  # MoE: the model's per-layer RoutingStats (with_routing)
    expert_ids: torch.Tensor | None = None  # MoE: (B, T, n_moe_layers, k) experts each position used


def sampling_logits(logits: torch.Tensor, transform: SamplingTransform | None) -> torch.Tensor:
    """(..., V) fp32 logits -> the logits of the sampling distribution: / temperature, -inf outside the
    top-k / top-p support. Unchanged (the same tensor) for None or the identity. Keeps grad."""
    if transform is None or transform.is_identity:
        return logits
    if transform.temperature != 1.0:
        logits = logits / transform.temperature  # (..., V)
    if transform.top_k == 0 and transform.top_p == 1.0:
        return logits
    outside = _outside_support(logits.detach(), transform.top_k, transform.top_p)  # (..., V) bool
    return logits.masked_fill(outside, float("-inf"))


@torch.no_grad()
def _outside_support(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(..., V) tempered logits -> (..., V) True where top-k / top-p drops the token.

    The same arithmetic as vLLM's CPU sampler (vllm/v1/sample/ops/topk_topp_sampler.py,
    `apply_top_k_top_p_pytorch` / `apply_top_k_only`): top-k keeps logits >= the k-th largest; top-p sorts
    ascending, and drops a token while the cumulative fp32 mass up to and including it is <= 1 - p.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    vocab = flat.shape[-1]
    use_k, use_p = 0 < top_k < vocab, top_p < 1.0
    if not (use_k or use_p):
        return torch.zeros_like(logits, dtype=torch.bool)
    # vLLM holds p as a float32 tensor and computes 1 - p in float32
    p_threshold = 1.0 - torch.tensor(top_p, dtype=torch.float32, device=flat.device)
    rows = max(1, _SUPPORT_CHUNK_ELEMENTS // vocab)
    out = []
    for block in flat.split(rows):  # (n, V)
        if use_k and not use_p:
            kth = block.topk(top_k, dim=-1).values[:, -1:]  # (n, 1)
            out.append(block < kth)
            continue
        values, order = block.sort(dim=-1)  # (n, V) ascending
        drop = torch.zeros_like(values, dtype=torch.bool)  # (n, V), in sorted order
        if use_k:
            drop = values < values[:, vocab - top_k : vocab - top_k + 1]
            values = values.masked_fill(drop, float("-inf"))
        if use_p:
            mass = values.softmax(dim=-1).cumsum(dim=-1)  # (n, V)
            drop_p = mass <= p_threshold
            drop_p[:, -1] = False  # the most likely token always stays
            drop = drop | drop_p
        out.append(torch.empty_like(drop).scatter_(-1, order, drop))  # back to vocab order
    return torch.cat(out).reshape(logits.shape)


def logprobs_from_logits(
    logits: torch.Tensor, input_ids: torch.Tensor, *, transform: SamplingTransform | None = None
) -> torch.Tensor:
    """(B, T, V) logits, (B, T) ids -> (B, T) log p(ids[:, t] | < t); column 0 is 0. With `transform`,
    under the sampling distribution (-inf for a token outside its support)."""
    logits = sampling_logits(logits[:, :-1].float(), transform)  # (B, T-1, V): logits at t-1 predict token t
    target = input_ids[:, 1:, None]  # (B, T-1, 1)
    logp = logits.gather(-1, target).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, T-1)
    return torch.nn.functional.pad(logp, (1, 0))  # (B, T)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, *, transform: SamplingTransform | None = None) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy of the next-token distribution that produced token t (with `transform`:
    the sampling distribution); column 0 is 0."""
    if transform is None or transform.is_identity:
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        entropy = -(logp.exp() * logp).sum(-1)  # (B, T-1)
    else:
        logp = torch.log_softmax(sampling_logits(logits[:, :-1].float(), transform), dim=-1)  # (B, T-1, V)
        # tokens outside the support: p = 0 and log p = -inf, whose product must count as 0, not NaN
        entropy = -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)  # (B, T-1)
    return torch.nn.functional.pad(entropy, (1, 0))  # (B, T)


def score_tokens(
    model: Callable[..., object],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    with_entropy: bool = True,
    with_routing: bool = True,
    transform: SamplingTransform | None = None,
    routed_experts: torch.Tensor | None = None,
) -> TokenScores:
    """Forward `model` (an HF causal LM or a DeepSpeed engine wrapping one) and score every position.

    input_ids, attention_mask (B, T). Routing statistics need a model that accepts `output_router_stats`
    (Step3p5, or a transformers MoE model with `rlstack.model.router_hooks`); they are None for other models
    or when `with_routing` is False. `transform`: score under
    the rollout's sampling distribution (see `SamplingTransform`); None or the identity is the policy.
    `routed_experts` (B, T, n_moe_layers, k): experts to replay (-1 = free), for routing replay.
    """
    # no KV cache: a training or scoring forward never continues (HF models build one by default)
    kwargs: dict[str, Any] = {"use_cache": False}
    if with_routing:
        kwargs["output_router_stats"] = True
    if routed_experts is not None:
        kwargs["routed_experts"] = routed_experts
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    logits = out.logits  # type: ignore[attr-defined]  # (B, T, V)
    routing = getattr(out, "routing_confidence", None) if with_routing else None
    return TokenScores(
        logp=logprobs_from_logits(logits, input_ids, transform=transform),
        entropy=entropy_from_logits(logits.detach(), transform=transform) if with_entropy else None,
        routing_confidence=None if routing is None else routing.detach().float(),
        router_stats=getattr(out, "router_stats", None) if with_routing else None,
        expert_ids=getattr(out, "expert_ids", None) if with_routing else None,
    )


def token_logprobs(
    model: Callable[..., object],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    return_entropy: bool = False,
    transform: SamplingTransform | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, L) log p(input_ids[:, t] | input_ids[:, :t]), position 0 = 0; with `return_entropy`, also the
    (B, L) entropy of each position's next-token distribution. Gradient flows if enabled by the caller.
    `transform`: under the rollout's sampling distribution (see `SamplingTransform`)."""
    scores = score_tokens(
        model,
        input_ids,
        attention_mask,
        with_entropy=return_entropy,
        with_routing=False,
        transform=transform,
    )
    if return_entropy:
        assert scores.entropy is not None
        return scores.logp, scores.entropy
    return scores.logp
