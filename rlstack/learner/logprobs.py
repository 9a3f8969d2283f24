"""Per-token log-probs (and entropy, routing confidence) of a causal LM, in the `PolicyBatch` convention:
the value at position t scores token t given tokens < t; position 0 has no context and holds 0.
Everything is computed in fp32 whatever the model's dtype (bf16 log-probs are off by whole nats).

With a `SamplingTransform` the log-probs are those of the distribution the rollout engine sampled from
(temperature, then top-k / top-p, renormalised), which is what vLLM records with
`logprobs_mode="processed_logprobs"` (rlstack.rollout.engine): every ratio (MIS-PO's x_t, PPO/GSPO, KL)
then compares two versions of one distribution.

Long sequences: the (B, T, V) logits (and their fp32 copies kept for the backward pass) grow as sequence x
vocabulary. `score_tokens` therefore applies the output head chunk by chunk along the sequence once a
micro-batch scores more than `chunk_tokens` positions (`learner.logprob_chunk_tokens`): the model body runs
once, the head input (B, T, H) is captured, and each chunk's logits -> log-prob (and entropy) runs under
activation checkpointing, so the backward pass recomputes one chunk's logits at a time instead of keeping
all of them. Results equal the unchunked path to float rounding (the head's gradient sums the chunks).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rlstack.learner.config import DEFAULT_LOGPROB_CHUNK_TOKENS
from rlstack.learner.packing import PackedRows
from rlstack.learner.packing import pack as pack_rows

# Rows of a (rows, V) logits block whose support is computed at once: bounds the sort's scratch (values
# and int64 indices) to a few hundred MB for large vocabularies.
_SUPPORT_CHUNK_ELEMENTS = 1 << 25

logger = logging.getLogger(__name__)

_chunk_tokens = DEFAULT_LOGPROB_CHUNK_TOKENS
"""What `score_tokens(chunk_tokens=None)` uses; the learner worker sets `learner.logprob_chunk_tokens`."""
_pack = False
"""What `score_tokens(pack=None)` uses; the learner worker sets `learner.pack_sequences`."""

# The value the output head returns while its input is captured (exact in bf16); a model that transforms its
# logits after the head (scale, soft-cap) shows it on this value, which `_check_logit_transform` compares.
_MARKER = 24.0
_warned_unchunked = False


def set_logprob_chunk_tokens(tokens: int) -> None:
    """Set the process-wide default of `score_tokens(chunk_tokens=None)` (0 = never chunk)."""
    global _chunk_tokens
    if tokens < 0:
        raise ValueError(f"logprob chunk of {tokens} tokens: must be >= 0 (0 = never chunk)")
    _chunk_tokens = int(tokens)


def set_pack_sequences(pack: bool) -> None:
    """Set the process-wide default of `score_tokens(pack=None)`."""
    global _pack
    _pack = bool(pack)


def logprob_chunk_tokens() -> int:
    """The process-wide default of `score_tokens(chunk_tokens=None)`."""
    return _chunk_tokens


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
    logp = _next_token_logprobs(logits, input_ids[:, 1:])  # (B, T-1)
    return torch.nn.functional.pad(logp, (1, 0))  # (B, T)


def _next_token_logprobs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(..., V) fp32 sampling logits, (...) ids -> (...) log p(id). Keeps grad."""
    return logits.gather(-1, target[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def _entropy(logits: torch.Tensor, masked: bool) -> torch.Tensor:
    """(..., V) fp32 sampling logits -> (...) entropy; `masked`: they may hold -inf (outside the support)."""
    logp = torch.log_softmax(logits, dim=-1)  # (..., V)
    if not masked:
        return -(logp.exp() * logp).sum(-1)
    # tokens outside the support: p = 0 and log p = -inf, whose product must count as 0, not NaN
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, *, transform: SamplingTransform | None = None) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy of the next-token distribution that produced token t (with `transform`:
    the sampling distribution); column 0 is 0."""
    identity = transform is None or transform.is_identity
    entropy = _entropy(sampling_logits(logits[:, :-1].float(), transform), not identity)  # (B, T-1)
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
    chunk_tokens: int | None = None,
    pack: bool | None = None,
) -> TokenScores:
    """Forward `model` (an HF causal LM, possibly PEFT-wrapped, or a DeepSpeed engine wrapping one) and score
    every position.

    input_ids, attention_mask (B, T). Routing statistics need a model that accepts `output_router_stats`
    (Step3p5, or a transformers MoE model with `rlstack.model.router_hooks`); they are None for other models
    or when `with_routing` is False. `transform`: score under
    the rollout's sampling distribution (see `SamplingTransform`); None or the identity is the policy.
    `routed_experts` (B, T, n_moe_layers, k): experts to replay (-1 = free), for routing replay.
    `chunk_tokens`: when the B * (T - 1) scored positions exceed it, the output head and the log-softmax run
    in chunks of about this many positions (see the module docstring); 0 = never; None = the process-wide
    setting (`set_logprob_chunk_tokens`, `learner.logprob_chunk_tokens`).
    `pack`: lay the rows' sequences end to end (rlstack.learner.packing; right-padded rows) so the forward
    computes (almost) no padding; outputs come back in the (B, T) layout. None = the process-wide setting
    (`set_pack_sequences`, `learner.pack_sequences`).
    """
    how = _Scoring(
        with_entropy, with_routing, transform, _chunk_tokens if chunk_tokens is None else chunk_tokens
    )
    if (_pack if pack is None else pack) and not bool(attention_mask.bool().all()):
        return _score_packed(model, input_ids, attention_mask, routed_experts, how)
    return _score_rows(model, input_ids, attention_mask, routed_experts, how)


@dataclass(frozen=True)
class _Scoring:
    """What `score_tokens` computes (its keyword arguments, resolved)."""

    with_entropy: bool
    with_routing: bool
    transform: SamplingTransform | None
    chunk_tokens: int


def _score_packed(
    model: Callable[..., object],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    routed_experts: torch.Tensor | None,
    how: _Scoring,
) -> TokenScores:
    """`score_tokens` through packed rows: pack, forward (transformers' packed format), unpack."""
    rows = pack_rows(input_ids, attention_mask)
    extra: dict[str, Any] = {"position_ids": rows.position_ids}
    if how.with_routing:
        extra["routing_token_mask"] = rows.token_mask  # the routing statistics count real tokens only
    replay = None if routed_experts is None else rows.pack(routed_experts, fill=-1)
    scores = _score_rows(model, rows.input_ids, None, replay, how, extra)
    B, T = input_ids.shape
    stats = scores.router_stats
    if stats is not None:  # per-token arrays back to the (B*T,) layout; counts and means are real-only
        stats = [_unpacked_stats(s, rows, B, T) for s in stats]
    return TokenScores(
        logp=rows.unpack_scores(scores.logp),
        entropy=_maybe(rows.unpack_scores, scores.entropy),
        routing_confidence=_maybe(rows.unpack, scores.routing_confidence),
        router_stats=stats,
        expert_ids=None if scores.expert_ids is None else rows.unpack(scores.expert_ids, fill=-1),
    )


def _maybe(fn: Callable[[torch.Tensor], torch.Tensor], value: torch.Tensor | None) -> torch.Tensor | None:
    return None if value is None else fn(value)


def _unpacked_stats(stats: Any, rows: PackedRows, B: int, T: int) -> Any:
    """A layer's RoutingStats with its per-token (P*T, ...) arrays in the (B*T, ...) layout (-1 ids and 0
    values on padding)."""
    P = rows.input_ids.shape[0]
    out = {}
    for name in ("confidence", "entropy"):  # (P*T,)
        out[name] = rows.unpack(getattr(stats, name).view(P, T)).reshape(B * T)
    for name in ("ids", "free_ids"):  # (P*T, k)
        value = getattr(stats, name)
        out[name] = rows.unpack(value.view(P, T, -1), fill=-1).reshape(B * T, value.shape[-1])
    return dataclasses.replace(stats, **out)


def _score_rows(
    model: Callable[..., object],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    routed_experts: torch.Tensor | None,
    how: _Scoring,
    extra: dict[str, Any] | None = None,
) -> TokenScores:
    """`score_tokens` of rows as given (`extra`: more model keywords, e.g. packed rows' position ids)."""
    # no KV cache: a training or scoring forward never continues (HF models build one by default)
    kwargs: dict[str, Any] = {"use_cache": False, **(extra or {})}
    with_entropy, with_routing, transform, chunk = (
        how.with_entropy,
        how.with_routing,
        how.transform,
        how.chunk_tokens,
    )
    if with_routing:
        kwargs["output_router_stats"] = True
    if routed_experts is not None:
        kwargs["routed_experts"] = routed_experts
    B, T = input_ids.shape
    head = _output_head(model) if 0 < chunk < B * (T - 1) else None
    if head is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = out.logits  # type: ignore[attr-defined]  # (B, T, V)
        logp = logprobs_from_logits(logits, input_ids, transform=transform)  # (B, T)
        entropy = entropy_from_logits(logits.detach(), transform=transform) if with_entropy else None
    else:
        with _head_input_captured(head) as captured:
            out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = _captured_hidden(captured, B, T)  # (B, T, H)
        post = _LogitTransform.of(model)
        _check_logit_transform(out.logits, captured[0][1], post, model)  # type: ignore[attr-defined]
        scorer = _ChunkScorer(head, post, transform, with_entropy)
        logp, entropy = scorer.score(hidden, input_ids, max(1, chunk // B))
    routing = getattr(out, "routing_confidence", None) if with_routing else None
    return TokenScores(
        logp=logp,
        entropy=entropy,
        routing_confidence=None if routing is None else routing.detach().float(),
        router_stats=getattr(out, "router_stats", None) if with_routing else None,
        expert_ids=getattr(out, "expert_ids", None) if with_routing else None,
    )


# ---- chunked output head ------------------------------------------------------------------------------


def _unwrapped(model: Any) -> Any:
    """The model under DeepSpeed engines (which hold it as `.module`); a PEFT model stays wrapped."""
    while isinstance(inner := getattr(model, "module", None), nn.Module):
        model = inner
    return model


def _output_head(model: Any) -> nn.Module | None:
    """The module that maps the last hidden state to logits (`get_output_embeddings()`: the LM head, a
    PEFT-wrapped one included), or None when scoring must stay unchunked: the model has none, or its head
    cannot be checkpointed under ZeRO-3 (`_checkpoint_mode`)."""
    get_head = getattr(_unwrapped(model), "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        return None
    if _checkpoint_mode(head) is None:
        global _warned_unchunked
        if not _warned_unchunked:
            _warned_unchunked = True
            logger.warning(
                "log-probs are scored unchunked: under ZeRO-3 an output head with both frozen and trainable "
                "parameters (LoRA adapters on lm_head) cannot be recomputed chunk by chunk; leave lm_head "
                "out of learner.lora.target_modules to bound the logits' memory"
            )
        return None
    return head


def _checkpoint_mode(head: nn.Module) -> Literal["reentrant", "non-reentrant"] | None:
    """How chunks of `head` are checkpointed. ZeRO-3 partitions the head's weights after every call of the
    head, also after the call that recomputes a chunk in the backward pass: non-reentrant checkpointing then
    finds a frozen weight emptied in place (deepspeedai/DeepSpeed#8148), and reentrant checkpointing, which
    recomputes as a fresh forward whose backward ZeRO-3's hooks gather the weights for, hands ZeRO-3 one
    gradient per chunk for a trainable weight (which it refuses). So under ZeRO-3 a frozen head (LoRA's base)
    is reentrant, a trainable one non-reentrant, and a head with both (None) is not chunked."""
    params = list(head.parameters())
    if not any(hasattr(p, "ds_id") for p in params):  # not partitioned by ZeRO-3
        return "non-reentrant"
    trainable = [p.requires_grad for p in params]
    if all(trainable):
        return "non-reentrant"
    return "reentrant" if not any(trainable) else None


@contextmanager
def _head_input_captured(head: nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """While active, calling `head` records (its input, the marker it returns) and returns a (..., 1) marker
    (stride 0: no memory) instead of the (..., V) logits. Module hooks (ZeRO-3's gathers) still run."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        marker = hidden.new_full((1,) * hidden.dim(), _MARKER).expand(*hidden.shape[:-1], 1)  # (B, T, 1)
        captured.append((hidden, marker))
        return marker

    own = head.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's hooks) to restore
    head.forward = capture  # type: ignore[method-assign]
    try:
        yield captured
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own  # type: ignore[method-assign]


def _captured_hidden(captured: list[tuple[torch.Tensor, torch.Tensor]], B: int, T: int) -> torch.Tensor:
    """The head's one (B, T, H) input, or an error saying why chunking does not fit the model."""
    shapes = [tuple(hidden.shape) for hidden, _ in captured]
    if len(captured) != 1 or shapes[0][:2] != (B, T):
        raise RuntimeError(
            f"chunked log-probs: the model called its output head with inputs of shapes {shapes}, expected "
            f"one call on ({B}, {T}, hidden); set learner.logprob_chunk_tokens: 0 to score unchunked"
        )
    return captured[0][0]


@dataclass(frozen=True)
class _LogitTransform:
    """What a causal LM does to the head's output before returning its logits, by architecture: Cohere
    multiplies by `logit_scale`, Granite divides by `config.logits_scaling`, Gemma 2/3/4 soft-cap
    (`config.final_logit_softcapping`: cap * tanh(logits / cap)). Step3p5, Llama, Qwen, Mixtral: nothing."""

    scale: float | None = None
    divisor: float | None = None
    softcap: float | None = None

    @classmethod
    def of(cls, model: Any) -> _LogitTransform:
        inner = _unwrapped(model)
        get_base = getattr(inner, "get_base_model", None)  # PEFT
        inner = get_base() if callable(get_base) else inner
        config = getattr(inner, "config", None)
        get_text = getattr(config, "get_text_config", None)
        text = get_text() if callable(get_text) else config

        def number(value: Any) -> float | None:
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

        return cls(
            scale=number(getattr(inner, "logit_scale", None)),
            divisor=number(getattr(text, "logits_scaling", None)),
            softcap=number(getattr(text, "final_logit_softcapping", None)) or None,
        )

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) head output -> the model's logits, in the head's dtype as the model computes them."""
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _check_logit_transform(logits: Any, marker: torch.Tensor, post: _LogitTransform, model: Any) -> None:
    """The model's returned logits, computed from the head's marker, must be what `post` makes of it: a
    transform of the logits that `_LogitTransform` does not know would otherwise be silently skipped."""
    expected = float(post(marker[(0,) * marker.dim()]))
    same_shape = isinstance(logits, torch.Tensor) and tuple(logits.shape) == tuple(marker.shape)
    got = float(logits.reshape(-1)[0]) if same_shape else None
    if got is None or abs(got - expected) > 1e-2 * abs(expected):
        name = type(_unwrapped(model)).__name__
        raise RuntimeError(
            f"chunked log-probs: {name} transforms its logits after the output head in a way rlstack does "
            f"not reproduce (head output {_MARKER} became {got}, expected {expected}; shape "
            f"{tuple(getattr(logits, 'shape', ()))}); set "
            "learner.logprob_chunk_tokens: 0 to score unchunked"
        )


class _ChunkScorer:
    """Head -> logit transform -> sampling transform -> log-prob (and entropy) for one chunk of positions,
    under activation checkpointing when grad is on: the forward keeps no (chunk, V) tensor; the backward
    recomputes one chunk's logits at a time."""

    def __init__(
        self, head: nn.Module, post: _LogitTransform, transform: SamplingTransform | None, with_entropy: bool
    ) -> None:
        self.head, self.post, self.transform = head, post, transform
        self.masked = not (transform is None or transform.is_identity)
        self.entropies: dict[int, torch.Tensor] | None = {} if with_entropy else None

    def __call__(self, hidden: torch.Tensor, target: torch.Tensor, index: int) -> torch.Tensor:
        """hidden (B, c, H) at positions t - 1, target (B, c) the ids at t -> (B, c) log-probs."""
        logits = sampling_logits(self.post(self.head(hidden)).float(), self.transform)  # (B, c, V)
        # the entropy is computed once; the backward's recomputation of this chunk skips it
        if self.entropies is not None and index not in self.entropies:
            self.entropies[index] = _entropy(logits.detach(), self.masked)  # (B, c)
        return _next_token_logprobs(logits, target)  # (B, c)

    def score(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, positions: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden (B, T, H), input_ids (B, T) -> (B, T) log-probs and entropies (column 0 is 0), in chunks of
        `positions` sequence positions."""
        grad = torch.is_grad_enabled()
        mode = _checkpoint_mode(self.head)
        trainable_head = any(p.requires_grad for p in self.head.parameters())
        parts = []
        inputs = hidden[:, :-1].split(positions, dim=1)  # (B, c, H) each: positions t - 1
        targets = input_ids[:, 1:].split(positions, dim=1)  # (B, c) each: the ids at t
        for i, (h, target) in enumerate(zip(inputs, targets, strict=True)):
            if not grad or not (h.requires_grad or trainable_head):  # no graph to keep
                parts.append(self(h, target, i))
            else:
                parts.append(checkpoint(self, h, target, i, use_reentrant=mode == "reentrant"))
        logp = torch.nn.functional.pad(torch.cat(parts, dim=1), (1, 0))  # (B, T)
        if self.entropies is None:
            return logp, None
        entropy = torch.cat([self.entropies[i] for i in range(len(parts))], dim=1)  # (B, T-1)
        return logp, torch.nn.functional.pad(entropy, (1, 0))


def token_logprobs(
    model: Callable[..., object],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    return_entropy: bool = False,
    transform: SamplingTransform | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, L) log p(input_ids[:, t] | input_ids[:, :t]), position 0 = 0; with `return_entropy`, also the
    (B, L) entropy of each position's next-token distribution. Gradient flows if enabled by the caller.
    `transform`: under the rollout's sampling distribution (see `SamplingTransform`); `chunk_tokens`: see
    `score_tokens`."""
    scores = score_tokens(
        model,
        input_ids,
        attention_mask,
        with_entropy=return_entropy,
        with_routing=False,
        transform=transform,
        chunk_tokens=chunk_tokens,
    )
    if return_entropy:
        assert scores.entropy is not None
        return scores.logp, scores.entropy
    return scores.logp
