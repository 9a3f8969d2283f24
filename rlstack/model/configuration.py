"""`Step3p5Config`: the Hugging Face config of the Step 3.5 Flash architecture.

The keys are exactly the ones vLLM's `Step3p5ForCausalLM` reads (vllm/transformers_utils/configs/step3p5.py),
so a directory saved by `save_pretrained` is served by vLLM unchanged. Only the features rlstack's PyTorch
model implements are accepted; `validate_supported` names the offending key otherwise.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig

FULL = "full_attention"
SLIDING = "sliding_attention"


class Step3p5Config(PretrainedConfig):
    model_type = "step3p5"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 128,
        intermediate_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_attention_groups: int = 2,
        head_dim: int = 32,
        layer_types: list[str] | None = None,
        sliding_window: int = 16,
        attention_other_setting: dict[str, Any] | None = None,
        use_head_wise_attn_gate: bool = True,
        rope_theta: float | list[float] = 10000.0,
        partial_rotary_factors: list[float] | None = None,
        max_position_embeddings: int = 2048,
        max_seq_len: int = 2048,
        rms_norm_eps: float = 1e-5,
        moe_layers_enum: str | None = None,
        moe_num_experts: int = 8,
        moe_top_k: int = 2,
        moe_intermediate_size: int = 64,
        share_expert_dim: int = 64,
        moe_router_activation: str = "sigmoid",
        moe_router_scaling_factor: float = 1.0,
        norm_expert_weight: bool = True,
        use_moe_router_bias: bool = True,
        need_fp32_gate: bool = True,
        att_impl_type: str = "GQA",
        use_moe: bool = True,
        num_nextn_predict_layers: int = 0,
        swiglu_limits: list[float] | None = None,
        swiglu_limits_shared: list[float] | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        pad_token_id: int | None = 0,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_attention_groups = num_attention_groups
        # transformers' generic code (caches, PEFT) looks for this name.
        self.num_key_value_heads = num_attention_groups
        self.head_dim = head_dim
        self.layer_types = layer_types or default_layer_types(num_hidden_layers)
        self.sliding_window = sliding_window
        self.attention_other_setting = attention_other_setting
        self.use_head_wise_attn_gate = use_head_wise_attn_gate
        self.rope_theta = rope_theta
        self.partial_rotary_factors = partial_rotary_factors or [1.0] * num_hidden_layers
        self.max_position_embeddings = max_position_embeddings
        self.max_seq_len = max_seq_len
        self.rms_norm_eps = rms_norm_eps
        self.moe_layers_enum = moe_layers_enum
        self.moe_num_experts = moe_num_experts
        self.moe_top_k = moe_top_k
        self.num_experts_per_tok = moe_top_k
        self.moe_intermediate_size = moe_intermediate_size
        self.share_expert_dim = share_expert_dim
        self.moe_router_activation = moe_router_activation
        self.moe_router_scaling_factor = moe_router_scaling_factor
        self.norm_expert_weight = norm_expert_weight
        self.use_moe_router_bias = use_moe_router_bias
        self.need_fp32_gate = need_fp32_gate
        self.att_impl_type = att_impl_type
        self.use_moe = use_moe
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.swiglu_limits = swiglu_limits
        self.swiglu_limits_shared = swiglu_limits_shared
        self.initializer_range = initializer_range
        # PreTrainedConfig's static signature (a dataclass_transform) lists its own fields only; at run time
        # its __init__ takes and sets any keyword (wrap_init_to_accept_kwargs).
        super().__init__(  # type: ignore[call-arg]
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # ---- derived views used by the PyTorch model -------------------------------------------------
    @property
    def moe_layer_ids(self) -> list[int]:
        """Layers with routed experts; the others use a dense SwiGLU MLP (vLLM's default: all but 0)."""
        if self.moe_layers_enum is None:
            return list(range(1, self.num_hidden_layers))
        return [int(i) for i in self.moe_layers_enum.split(",") if i.strip()]

    def attention_shape(self, layer_idx: int) -> tuple[int, int, int]:
        """(num_heads, num_kv_heads, head_dim) of a layer; see attention_other_setting for sliding layers."""
        other = self.attention_other_setting
        if other and self.layer_types[layer_idx] == other["attention_type"]:
            return other["num_attention_heads"], other["num_attention_groups"], other["head_dim"]
        return self.num_attention_heads, self.num_attention_groups, self.head_dim

    def layer_swiglu_limit(self, layer_idx: int, shared: bool) -> float | None:
        """Activation clipping of a layer's routed experts (`swiglu_limits`) or of its shared expert and
        dense MLP (`swiglu_limits_shared`); None (or 0) = off."""
        limits = (self.swiglu_limits_shared if shared else self.swiglu_limits) or []
        value = limits[layer_idx] if layer_idx < len(limits) else None
        return float(value) if value else None

    def layer_rope_theta(self, layer_idx: int) -> float:
        theta = self.rope_theta
        return float(theta[layer_idx] if isinstance(theta, list) else theta)

    def validate_supported(self) -> None:
        """Refuse configs the PyTorch model cannot reproduce exactly (vLLM would disagree with it)."""
        problems = []
        if self.moe_router_activation != "sigmoid":
            problems.append(f"moe_router_activation={self.moe_router_activation!r} (only 'sigmoid')")
        if self.att_impl_type != "GQA":
            problems.append(f"att_impl_type={self.att_impl_type!r} (only 'GQA')")
        if self.num_attention_groups < 2:
            problems.append("num_attention_groups must be > 1 (vLLM's Step3p5 supports GQA only)")
        if any(t not in (FULL, SLIDING) for t in self.layer_types):
            problems.append(f"layer_types must be {FULL!r} or {SLIDING!r}, got {self.layer_types}")
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        if any(f not in (0.5, 1.0) for f in self.partial_rotary_factors):
            problems.append(f"partial_rotary_factors must be 0.5 or 1.0, got {self.partial_rotary_factors}")
        if any(x not in (None, 0, 7, 7.0) for x in (self.swiglu_limits or [])):
            problems.append(
                f"swiglu_limits {self.swiglu_limits}: vLLM's fused MoE clips routed experts at 7.0 only"
            )
        if self.moe_top_k > self.moe_num_experts:
            problems.append(f"moe_top_k={self.moe_top_k} > moe_num_experts={self.moe_num_experts}")
        if not self.use_moe_router_bias or not self.need_fp32_gate:
            problems.append("use_moe_router_bias and need_fp32_gate must both be true (vLLM asserts it)")
        if self.tie_word_embeddings:
            problems.append("tie_word_embeddings must be false (vLLM's Step3p5 has its own lm_head)")
        if problems:
            raise ValueError("unsupported Step3p5 config: " + "; ".join(problems))


def default_layer_types(num_layers: int) -> list[str]:
    """Step 3.5 Flash's 3:1 pattern: every fourth layer (0, 4, 8, ...) full, the rest sliding-window."""
    return [FULL if i % 4 == 0 else SLIDING for i in range(num_layers)]
