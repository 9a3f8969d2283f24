"""The Step 3.5 Flash architecture in PyTorch, numerically matched to vLLM's `Step3p5ForCausalLM`.

Per layer: Gemma-style RMSNorm (x * (1 + w)) → GQA attention (per-head q/k RMSNorm, NeoX RoPE on the
first `partial_rotary_factor` of each head, sliding-window on 3 of every 4 layers, a sigmoid gate per
head) → residual → RMSNorm → FFN (dense SwiGLU on the first layer(s), else routed experts chosen by a
sigmoid router with a selection-only bias, plus one always-on shared expert) → residual.

Simplified, on purpose: no tensor/expert parallelism (DeepSpeed ZeRO shards the parameters instead),
experts run as a Python loop over the experts that received tokens (fine at our sizes), no MTP head
(`num_nextn_predict_layers` must be 0). Parameter names equal the checkpoint names vLLM loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from rlstack.model.configuration import SLIDING, Step3p5Config


class GemmaRMSNorm(nn.Module):
    """RMSNorm with a zero-initialised weight applied as (1 + w), computed in fp32 like vLLM's."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * (1.0 + self.weight.float())).to(dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None) -> torch.Tensor:
    """silu(gate) * up; with Step 3.5 Flash's activation clipping (`limit`, vLLM's SwigluStepAndMul):
    silu(gate) clamped to <= limit and up to [-limit, limit]."""
    act = F.silu(gate)
    if limit:
        act, up = act.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return act * up


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); used for the dense MLP and the shared expert, clipped at `limit`."""

    def __init__(self, hidden: int, inner: int, limit: float | None = None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


def apply_neox_rope(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """Rotate the first `rotary_dim` channels of each head, NeoX (rotate-half) layout.

    x: (B, H, T, D); positions: (B, T).
    """
    # on the positions' device: a CPU inv_freq times CUDA positions is a device mismatch
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float, device=positions.device) / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, rotary_dim/2)
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]  # (B, 1, T, rotary_dim/2)
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((rotated, rest), dim=-1)


class Step3p5Attention(nn.Module):
    def __init__(self, config: Step3p5Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.attention_shape(layer_idx)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.use_gate = config.use_head_wise_attn_gate
        if self.use_gate:
            self.g_proj = nn.Linear(hidden, self.num_heads, bias=False)  # one gate logit per head
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == SLIDING else None
        self.rotary_dim = int(self.head_dim * config.partial_rotary_factors[layer_idx])
        self.rope_theta = config.layer_rope_theta(layer_idx)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, H)
        positions: torch.Tensor,  # (B, T)
        key_padding: torch.Tensor | None,  # (B, S) bool, True = real token, over all keys incl. cache
        cache: Cache | None,
        segments: torch.Tensor | None = None,  # (B, T) packed-sequence index of each token (no cache)
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_neox_rope(q, positions, self.rotary_dim, self.rope_theta)  # (B, nh, T, D)
        k = apply_neox_rope(k, positions, self.rotary_dim, self.rope_theta)  # (B, nkv, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, S, D): every key seen so far
        mask = self._mask(T, k.shape[2], key_padding, x.device)  # (B or 1, 1, T, S)
        if segments is not None:  # packed rows: a token sees only its own sequence
            mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])  # (B, 1, T, T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, nh, T, D)
        if self.use_gate:
            gate = torch.sigmoid(self.g_proj(x)).transpose(1, 2)[..., None]  # (B, nh, T, 1)
            out = out * gate
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def _mask(self, T: int, S: int, key_padding: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Causal (+ sliding-window, + key padding) boolean mask; queries are the last T of S positions.

        A query at index i sees key j when j <= i and, on sliding layers, i - j < window (vLLM's convention).
        """
        q_idx = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
        k_idx = torch.arange(S, device=device)[None, :]  # (1, S)
        mask = k_idx <= q_idx
        if self.sliding_window is not None:
            mask = mask & (q_idx - k_idx < self.sliding_window)
        mask = mask[None, None]  # (1, 1, T, S)
        if key_padding is not None:
            mask = mask & key_padding[:, None, None, -S:]
            # A fully padded query row (left padding) would softmax over nothing: let it see itself.
            mask = mask | _eye_offset(T, S, S - T, device)[None, None]
        return mask


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, T) index of the packed sequence each token belongs to (a new one wherever the position is not one
    above its predecessor), or None when every row holds one sequence."""
    step = torch.diff(position_ids, dim=-1) != 1  # (B, T-1)
    if not bool(step.any()):
        return None
    return torch.nn.functional.pad(step.long().cumsum(-1), (1, 0))  # (B, T)


def _eye_offset(T: int, S: int, offset: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool with True at [i, i + offset]."""
    return torch.arange(S, device=device)[None, :] == (torch.arange(T, device=device)[:, None] + offset)


@dataclass
class RoutingStats:
    """Per-layer routing facts of one forward pass over N = B*T token rows.

    `mean_score` keeps its gradient (the balancing loss is built from it); everything else is detached.
    Counts and means are over real tokens only when the forward had a token mask (padding excluded)."""

    confidence: torch.Tensor  # (N,) score mass of the selected experts / all experts, per token
    expert_counts: torch.Tensor  # (E,) real tokens routed to each expert (top-k slots counted)
    ids: torch.Tensor  # (N, k) the experts used (replayed ones where replay was given)
    free_ids: torch.Tensor  # (N, k) the experts the router itself picks (= ids without replay)
    entropy: torch.Tensor  # (N,) entropy of the normalised router scores s_e / sum(s), nats
    mean_score: torch.Tensor  # (E,) mean over real tokens of the normalised scores (with grad)


class PackedExpertWeight(nn.Module):
    """All experts' copies of one projection in one (E, out, in) tensor, named `<proj>.weight` like vLLM's."""

    def __init__(self, num_experts: int, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))


class Step3p5MoE(nn.Module):
    """Routed experts (packed weights in vLLM's checkpoint layout) and their router with selection bias."""

    router_bias: torch.Tensor  # (E,) a buffer (register_buffer below)

    def __init__(self, config: Step3p5Config, limit: float | None = None) -> None:
        super().__init__()
        E, H, inner = config.moe_num_experts, config.hidden_size, config.moe_intermediate_size
        self.limit = limit  # activation clipping of the routed experts (swiglu_limits)
        self.top_k = config.moe_top_k
        self.renormalize = config.norm_expert_weight
        self.scaling = config.moe_router_scaling_factor
        self.gate = nn.Linear(H, E, bias=False)  # router, fp32
        # Aux-loss-free load balancing: the bias steers which experts are chosen, never their weights.
        # It is not learned by gradient descent (vLLM marks it requires_grad=False too).
        self.register_buffer("router_bias", torch.zeros(E))
        self.gate_proj = PackedExpertWeight(E, inner, H)
        self.up_proj = PackedExpertWeight(E, inner, H)
        self.down_proj = PackedExpertWeight(E, H, inner)

    def route(
        self, x: torch.Tensor, replay: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, RoutingStats]:
        """x: (N, H) → weights (N, k), expert ids (N, k), stats.

        `replay` (N, k) long: experts to use instead of the router's choice (routing replay), -1 rows =
        the router chooses. Replayed experts get their weights from the LIVE router scores (renormalised
        over the replayed set), so the router keeps its gradient. `token_mask` (N,) bool: the real tokens
        the statistics count (None = all)."""
        # fp32 routing also when the model is held in bf16 (vLLM's need_fp32_gate); a no-op cast in fp32
        scores = torch.sigmoid(F.linear(x.float(), self.gate.weight.float()))  # (N, E)
        free_ids = torch.topk(scores + self.router_bias, self.top_k, dim=-1).indices  # (N, k)
        ids = free_ids
        if replay is not None:
            ids = torch.where(replay[:, :1] >= 0, replay.to(free_ids.dtype), free_ids)  # (N, k)
        weights = scores.gather(1, ids)  # (N, k): unbiased scores of the chosen experts
        total = scores.sum(-1, keepdim=True)  # (N, 1)
        confidence = weights.sum(-1) / total.squeeze(-1)  # (N,)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * self.scaling
        probs = scores / total  # (N, E): the router's scores as a distribution
        real = token_mask if token_mask is not None else torch.ones_like(confidence, dtype=torch.bool)
        n_real = real.sum().clamp(min=1)
        counts = torch.bincount(ids[real].flatten(), minlength=scores.shape[-1])
        entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)  # (N,)
        mean_score = (probs * real[:, None]).sum(0) / n_real  # (E,)
        stats = RoutingStats(
            confidence.detach(),
            counts.detach(),
            ids.detach(),
            free_ids.detach(),
            entropy.detach(),
            mean_score,
        )
        return weights, ids, stats

    def forward(
        self, x: torch.Tensor, replay: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RoutingStats]:
        weights, ids, stats = self.route(x, replay, token_mask)  # (N, k), (N, k)
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            token_idx, slot = torch.where(ids == e)  # tokens that chose expert e
            h = x[token_idx]  # (n_e, H)
            h = swiglu(h @ self.gate_proj.weight[e].T, h @ self.up_proj.weight[e].T, self.limit)  # (n_e, I)
            h = (h @ self.down_proj.weight[e].T) * weights[token_idx, slot, None].to(h.dtype)  # (n_e, H)
            out.index_add_(0, token_idx, h)
        return out, stats


class Step3p5DecoderLayer(GradientCheckpointingLayer):
    """Attention then the MLP or MoE; with `gradient_checkpointing_enable()` its activations are recomputed in
    the backward pass (transformers' GradientCheckpointingLayer)."""

    def __init__(self, config: Step3p5Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Step3p5Attention(config, layer_idx)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = layer_idx in config.moe_layer_ids
        shared_limit = config.layer_swiglu_limit(layer_idx, shared=True)
        if self.is_moe:
            self.moe = Step3p5MoE(config, config.layer_swiglu_limit(layer_idx, shared=False))
            self.share_expert = SwiGLU(config.hidden_size, config.share_expert_dim, shared_limit)
        else:  # vLLM's Step3p5MLP reads swiglu_limits_shared for dense layers too
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, shared_limit)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        key_padding: torch.Tensor | None,
        cache: Cache | None,
        replay: torch.Tensor | None = None,  # (B*T, k) experts to replay, -1 rows free
        token_mask: torch.Tensor | None = None,  # (B*T,) bool real tokens, for routing statistics
        segments: torch.Tensor | None = None,  # (B, T) packed-sequence index of each token
    ) -> tuple[torch.Tensor, RoutingStats | None]:
        x = x + self.self_attn(self.input_layernorm(x), positions, key_padding, cache, segments)
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h), None
        flat = h.reshape(-1, h.shape[-1])  # (B*T, H)
        routed, stats = self.moe(flat, replay, token_mask)
        return x + (routed + self.share_expert(flat)).view_as(h), stats


@dataclass
class Step3p5Output(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus routing statistics (filled when `output_router_stats=True`)."""

    routing_confidence: torch.Tensor | None = None  # (B, T): mean over MoE layers
    expert_load: torch.Tensor | None = None  # (n_moe_layers, E) token counts
    router_stats: list[RoutingStats] | None = None  # one per MoE layer, in layer order
    expert_ids: torch.Tensor | None = None  # (B, T, n_moe_layers, k) the experts each token used


class Step3p5BaseOutput(NamedTuple):
    """The backbone's output: unpacks as `(hidden, stats)`, and has HF's `last_hidden_state` for code that
    calls `model.base_model(...)` (TRL's fused LM-head loss does)."""

    last_hidden_state: torch.Tensor  # (B, T, H), after the final norm
    router_stats: list[RoutingStats]  # one per MoE layer


class Step3p5PreTrainedModel(PreTrainedModel):
    config: Step3p5Config  # always ours: __init__ converts vLLM's config class
    config_class = Step3p5Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Step3p5DecoderLayer"]  # noqa: RUF012 (transformers reads class attributes)
    _supports_sdpa = True

    def __init__(self, config: Step3p5Config, *args: object, **kwargs: object) -> None:
        # vLLM registers its own Step3p5Config under the same model_type; accept it by converting.
        if not isinstance(config, Step3p5Config):
            config = Step3p5Config(**config.to_dict())
        super().__init__(config, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding, PackedExpertWeight)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, GemmaRMSNorm):
            nn.init.zeros_(module.weight)
        elif isinstance(module, Step3p5MoE):
            module.router_bias.zero_()


class Step3p5Model(Step3p5PreTrainedModel):
    def __init__(self, config: Step3p5Config) -> None:
        super().__init__(config)
        config = self.config  # possibly converted from vLLM's config class
        config.validate_supported()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Step3p5DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = real token, S = past + T
        position_ids: torch.Tensor | None = None,  # (B, T)
        past_key_values: Cache | None = None,
        routed_experts: torch.Tensor | None = None,  # (B, T, n_moe_layers, k) replay, -1 = route freely
        routing_token_mask: torch.Tensor | None = None,  # (B, T) bool tokens routing statistics count
        **kwargs: object,  # HF callers pass use_cache, return_dict, ...; the output does not change
    ) -> Step3p5BaseOutput:
        """Packed rows (transformers' convention: `position_ids` given, no `attention_mask`, no KV cache): a
        position that is not one above its predecessor starts a new sequence, and each token attends only
        to its own sequence. `routing_token_mask` says which tokens routing statistics count (default: the
        attention mask's, else all)."""
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        packed = position_ids is not None and attention_mask is None and past_key_values is None
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
            else:
                position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
                position_ids = position_ids.expand(input_ids.shape[0], -1)
        key_padding = attention_mask.bool() if attention_mask is not None else None
        if key_padding is not None and bool(key_padding.all()):
            key_padding = None  # the common training case: right padding never precedes a real token
        x = self.embed_tokens(input_ids)
        B, T = input_ids.shape
        token_mask = attention_mask[:, -T:].reshape(-1).bool() if attention_mask is not None else None
        if routing_token_mask is not None:
            token_mask = routing_token_mask.reshape(-1).bool()  # (B*T,)
        segments = packed_segments(position_ids) if packed else None
        if routed_experts is not None:
            n_moe, k = len(self.config.moe_layer_ids), self.config.moe_top_k
            if tuple(routed_experts.shape) != (B, T, n_moe, k):
                raise ValueError(
                    f"routed_experts has shape {tuple(routed_experts.shape)}; expected (B, T, n_moe_layers, "
                    f"top_k) = {(B, T, n_moe, k)}"
                )
        stats: list[RoutingStats] = []
        for layer in self.layers:
            replay = None
            if routed_experts is not None and layer.is_moe:
                replay = routed_experts[:, :, len(stats)].reshape(B * T, -1).long()  # (B*T, k)
            x, layer_stats = layer(
                x, position_ids, key_padding, past_key_values, replay, token_mask, segments=segments
            )
            if layer_stats is not None:
                stats.append(layer_stats)
        return Step3p5BaseOutput(self.norm(x), stats)


class Step3p5ForCausalLM(Step3p5PreTrainedModel, GenerationMixin):
    _tied_weights_keys: dict[str, str] = {}  # noqa: RUF012 (transformers reads it as a class attribute)

    def __init__(self, config: Step3p5Config) -> None:
        super().__init__(config)
        config = self.config
        self.model = Step3p5Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_router_stats: bool = False,
        routed_experts: torch.Tensor | None = None,
        routing_token_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> Step3p5Output:
        """`routed_experts` (B, T, n_moe_layers, k): routing replay (see `Step3p5MoE.route`); -1 = free.
        `output_router_stats`: fill routing_confidence, expert_load, router_stats and expert_ids. Packed
        rows and `routing_token_mask`: see `Step3p5Model.forward`."""
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()  # full-length per layer; sliding is applied by the mask
        hidden, stats = self.model(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            routed_experts=routed_experts,
            routing_token_mask=routing_token_mask,
        )
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        out = Step3p5Output(
            loss=loss,  # type: ignore[arg-type]  # transformers annotates it torch.FloatTensor; any float Tensor
            logits=logits,
            past_key_values=past_key_values if use_cache else None,
        )
        if output_router_stats and stats:
            B, T = input_ids.shape
            out.routing_confidence = torch.stack([s.confidence for s in stats]).mean(0).view(B, T)
            out.expert_load = torch.stack([s.expert_counts for s in stats])
            out.router_stats = stats
            out.expert_ids = torch.stack([s.ids for s in stats], dim=1).view(B, T, len(stats), -1)
        return out
