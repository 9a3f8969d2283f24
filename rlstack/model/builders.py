"""Builder functions for policy configs and freshly initialised checkpoints (no hub, no downloads): Step3p5
presets, and tiny transformers architectures (Llama, Qwen3, Qwen3-MoE) for the any-architecture tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from rlstack.model.configuration import FULL, SLIDING, Step3p5Config, default_layer_types
from rlstack.model.tokenizer import build_tokenizer


def step3p5_config(
    hidden_size: int,
    num_layers: int,
    full_heads: int,
    sliding_heads: int,
    kv_heads: int,
    head_dim: int,
    num_experts: int,
    top_k: int,
    expert_dim: int,
    shared_dim: int,
    dense_dim: int,
    sliding_window: int,
    vocab_size: int = 128,
    max_positions: int = 2048,
    moe_layers: Sequence[int] | None = None,
) -> Step3p5Config:
    """A Step 3.5 Flash-shaped config: layers 3:1 sliding:full, more query heads on sliding layers,
    partial RoPE (half the head) with a larger base on full layers, layer 0 dense, the rest MoE.
    `moe_layers`: the layers with routed experts instead (None: 1 .. num_layers - 1; empty: a dense model
    whose every layer is a SwiGLU MLP of width `dense_dim`)."""
    layer_types = default_layer_types(num_layers)
    if moe_layers is None:
        moe_layers = range(1, num_layers)
    return Step3p5Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=dense_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=full_heads,
        num_attention_groups=kv_heads,
        head_dim=head_dim,
        layer_types=layer_types,
        sliding_window=sliding_window,
        attention_other_setting={
            "attention_type": SLIDING,
            "num_attention_heads": sliding_heads,
            "num_attention_groups": kv_heads,
            "head_dim": head_dim,
        },
        rope_theta=[1_000_000.0 if t == FULL else 10_000.0 for t in layer_types],
        partial_rotary_factors=[0.5 if t == FULL else 1.0 for t in layer_types],
        max_position_embeddings=max_positions,
        max_seq_len=max_positions,
        moe_layers_enum=",".join(str(i) for i in moe_layers),
        moe_num_experts=num_experts,
        moe_top_k=top_k,
        moe_intermediate_size=expert_dim,
        share_expert_dim=shared_dim,
    )


def tiny() -> Step3p5Config:
    """About 2.7M parameters: tests and the CPU demo."""
    return step3p5_config(
        hidden_size=192, num_layers=4, full_heads=4, sliding_heads=8, kv_heads=2, head_dim=32,
        num_experts=8, top_k=2, expert_dim=128, shared_dim=128, dense_dim=512, sliding_window=32,
    )  # fmt: skip


def tiny_dense() -> Step3p5Config:
    """tiny() without experts: the same attention (hidden 192, 4 layers, 3:1 sliding:full) and a dense SwiGLU
    MLP of width 416 in every layer (`moe_layers_enum` "": no MoE layer), for dense-vs-MoE ablations.

    The width matches tiny()'s ACTIVE parameters per token. tiny: layer 0 dense 512, layers 1-3 two routed
    experts of 128 + a shared expert of 128 = 384 active, plus the router (192 x 8) -> FFN inner width
    512 + 3 x 384 = 1664 active (each unit 3 x 192 = 576 parameters). 4 x 416 = 1664 here.
    Parameters (counted on the built models, tests/unit/model/test_dense_builder.py):
      tiny:       2,789,056 total, 1,461,952 active per token (routed experts count top-2 of 8);
      tiny_dense: 1,457,344 total = active (4,608 = 0.3% fewer: tiny's three 192 x 8 routers).
    """
    return step3p5_config(
        hidden_size=192, num_layers=4, full_heads=4, sliding_heads=8, kv_heads=2, head_dim=32,
        num_experts=8, top_k=2, expert_dim=128, shared_dim=128, dense_dim=416, sliding_window=32,
        moe_layers=(),
    )  # fmt: skip


def small() -> Step3p5Config:
    """About 100M parameters: benchmarks."""
    return step3p5_config(
        hidden_size=768, num_layers=8, full_heads=12, sliding_heads=16, kv_heads=4, head_dim=64,
        num_experts=8, top_k=2, expert_dim=512, shared_dim=1024, dense_dim=2048, sliding_window=256,
    )  # fmt: skip


def medium() -> Step3p5Config:
    """About 30M parameters (8 experts top-2: about 14M active per token): the vs-TRL benchmark."""
    return step3p5_config(
        hidden_size=384, num_layers=8, full_heads=6, sliding_heads=8, kv_heads=2, head_dim=64,
        num_experts=8, top_k=2, expert_dim=320, shared_dim=512, dense_dim=1024, sliding_window=128,
    )  # fmt: skip


def _hf_common() -> dict[str, Any]:
    """Shapes shared by the tiny transformers-architecture builders: the tiny tokenizer's vocabulary padded
    to 128 rows, as Step3p5's tiny() has it."""
    return {
        "vocab_size": 128,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 2048,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }


def tiny_llama() -> PretrainedConfig:
    """A 0.33M-parameter Llama (transformers' LlamaForCausalLM; vLLM's Llama): any-architecture tests."""
    from transformers import LlamaConfig

    return LlamaConfig(**_hf_common())


def tiny_qwen3() -> PretrainedConfig:
    """A 0.33M-parameter Qwen3 (q/k norms): any-architecture tests."""
    from transformers import Qwen3Config

    return Qwen3Config(**_hf_common())


def tiny_qwen3_moe() -> PretrainedConfig:
    """A 0.53M-parameter Qwen3-MoE, 8 experts top-2 in both layers (softmax router, renormalised top-k):
    any-architecture tests of a transformers MoE class."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_hf_common(),
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        decoder_sparse_step=1,
        norm_topk_prob=True,
    )


BUILDERS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny": tiny,
    "tiny_dense": tiny_dense,
    "medium": medium,
    "small": small,
    "tiny_llama": tiny_llama,
    "tiny_qwen3": tiny_qwen3,
    "tiny_qwen3_moe": tiny_qwen3_moe,
}


def init_checkpoint(config: PretrainedConfig, path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised fp32 policy (any causal-LM config transformers knows: Step3p5 or a
    transformers architecture) + the tiny tokenizer as an HF directory that vLLM loads."""
    from transformers import AutoModelForCausalLM

    from rlstack.model.modeling import Step3p5ForCausalLM

    torch.manual_seed(seed)
    if isinstance(config, Step3p5Config):
        model = Step3p5ForCausalLM(config).float()
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = Path(path)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path
