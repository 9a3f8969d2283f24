"""Model FLOPs, the machine's matmul peak, and utilisation (MFU): how close a step runs to the limit.

Model FLOPs (PaLM's MFU convention), per token of a causal LM's forward pass:

    2 x (active matmul parameters) + 2 x 2 x sum over layers (n_heads x head_dim x attended keys)

Active matmul parameters: every layer's attention projections (q, k, v, o, and Step3p5's per-head gate), its
FFN as the token uses it (a dense SwiGLU MLP, or the router + the top-k routed experts + the shared expert),
and the LM head. Embedding lookups, norms, activations, softmax and the loss are not counted. The attention
term is Q K^T and (scores) V over the keys the token attends: causal, so position i (0-based) attends i + 1
keys, at most `sliding_window` on sliding-window layers.

A training step (forward + backward) counts 3 x forward: the backward pass computes the gradients of both
the inputs and the weights of every matmul, 2 x forward (the standard 6N per token). Recomputation under
activation checkpointing (`learner.gradient_checkpointing`) and work on padding are NOT counted: these are
model FLOPs, not the hardware's; MFU = model FLOPs / seconds / peak FLOP/s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rlstack.types import Rollout

TRAIN_MULTIPLIER = 3.0
"""Training FLOPs per forward FLOP: forward (1) + backward (2: input and weight gradients)."""


@dataclass(frozen=True)
class AttentionLayer:
    """The context-dependent part of one layer: `width` = query heads x head dim; `window`: the sliding
    window (keys attended at most), None on full-attention layers."""

    width: int
    window: int | None = None


@dataclass(frozen=True)
class FlopsPerToken:
    """A model's forward FLOPs per token: `2 * matmul_params` (context-independent) plus the attention
    scores and values over the attended keys; `breakdown`: the active matmul parameters by part."""

    matmul_params: int
    attention: tuple[AttentionLayer, ...]
    breakdown: dict[str, int]

    def forward(self, context: float) -> float:
        """Forward FLOPs of one token attending `context` keys (per token, the mean attended length: about
        (n + 1) / 2 for the n tokens of a causal sequence); sliding layers attend at most their window."""
        attention = sum(4 * a.width * min(context, a.window or math.inf) for a in self.attention)
        return 2.0 * self.matmul_params + attention

    def train(self, context: float) -> float:
        """Forward + backward FLOPs of one token (3 x forward)."""
        return TRAIN_MULTIPLIER * self.forward(context)

    def sequences_forward(self, lengths: Sequence[int]) -> float:
        """Exact causal forward FLOPs of whole sequences of these real lengths (every position: a query)."""
        total = 0.0
        for n in lengths:
            total += 2.0 * self.matmul_params * n
            total += sum(4.0 * a.width * attended_keys(n, a.window) for a in self.attention)
        return total


def attended_keys(n: int, window: int | None = None) -> int:
    """Keys attended by the n positions of a causal sequence, summed: sum over i of min(i + 1, window)."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def _swiglu(hidden: int, inner: int) -> int:
    return 3 * hidden * inner  # gate, up, down


def _attention_params(hidden: int, heads: int, kv_heads: int, head_dim: int) -> int:
    return hidden * head_dim * (2 * heads + 2 * kv_heads)  # q and o, k and v


def _step3p5(config: Any) -> FlopsPerToken:
    from rlstack.model.configuration import SLIDING, Step3p5Config

    if not isinstance(config, Step3p5Config):  # vLLM's config class of the same model_type
        config = Step3p5Config(**config.to_dict())
    H = config.hidden_size
    parts = dict.fromkeys(("attention", "dense_mlp", "router", "routed_experts", "shared_experts"), 0)
    layers = []
    moe = set(config.moe_layer_ids)
    for i in range(config.num_hidden_layers):
        heads, kv_heads, head_dim = config.attention_shape(i)
        parts["attention"] += _attention_params(H, heads, kv_heads, head_dim)
        parts["attention"] += H * heads if config.use_head_wise_attn_gate else 0  # one gate logit per head
        sliding = config.layer_types[i] == SLIDING
        layers.append(AttentionLayer(heads * head_dim, config.sliding_window if sliding else None))
        if i in moe:
            parts["router"] += H * config.moe_num_experts
            parts["routed_experts"] += config.moe_top_k * _swiglu(H, config.moe_intermediate_size)
            parts["shared_experts"] += _swiglu(H, config.share_expert_dim)
        else:
            parts["dense_mlp"] += _swiglu(H, config.intermediate_size)
    parts["lm_head"] = H * config.vocab_size
    return FlopsPerToken(sum(parts.values()), tuple(layers), parts)


def _hf(config: Any) -> FlopsPerToken:
    """Llama / Mistral / Qwen2 / Qwen3 (dense SwiGLU), Qwen2-MoE / Qwen3-MoE (experts every
    `decoder_sparse_step` layers but `mlp_only_layers`; Qwen2-MoE's gated shared expert) and Mixtral."""
    H, L = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or H // heads
    window = getattr(config, "sliding_window", None) or None
    types = getattr(config, "layer_types", None)
    if types is None and getattr(config, "use_sliding_window", True) is False:
        window = None  # Qwen2-style configs without layer_types: the window is off
    k = getattr(config, "num_experts_per_tok", 0)
    if getattr(config, "moe_intermediate_size", None) and getattr(config, "num_experts", 0):  # Qwen-MoE
        experts, expert_dim = config.num_experts, config.moe_intermediate_size
        step = getattr(config, "decoder_sparse_step", 1) or 1
        dense_only = set(getattr(config, "mlp_only_layers", None) or ())
        is_moe = [i not in dense_only and (i + 1) % step == 0 for i in range(L)]
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
    elif getattr(config, "num_local_experts", 0):  # Mixtral: every layer
        experts, expert_dim, shared = config.num_local_experts, config.intermediate_size, 0
        is_moe = [True] * L
    else:
        experts, expert_dim, shared, is_moe = 0, 0, 0, [False] * L
    parts = dict.fromkeys(("attention", "dense_mlp", "router", "routed_experts", "shared_experts"), 0)
    layers = []
    for i in range(L):
        parts["attention"] += _attention_params(H, heads, kv_heads, head_dim)
        sliding = window if types is None else (window if types[i] == "sliding_attention" else None)
        layers.append(AttentionLayer(heads * head_dim, sliding))
        if is_moe[i]:
            parts["router"] += H * experts + (H if shared else 0)  # + the shared expert's gate
            parts["routed_experts"] += k * _swiglu(H, expert_dim)
            parts["shared_experts"] += _swiglu(H, shared) if shared else 0
        else:
            parts["dense_mlp"] += _swiglu(H, config.intermediate_size)
    parts["lm_head"] = H * config.vocab_size  # a matmul also when tied to the embedding
    return FlopsPerToken(sum(parts.values()), tuple(layers), parts)


def model_flops_per_token(config: Any) -> FlopsPerToken:
    """The forward FLOPs per token of a transformers causal-LM config: rlstack's Step3p5 (dense and MoE
    layers, sliding and full attention with their own head counts), or a Llama / Qwen2 / Qwen3 / Qwen3-MoE /
    Mixtral-shaped config (SwiGLU MLPs; `text_config` of a multimodal config is used when present)."""
    config = getattr(config, "text_config", None) or config
    if getattr(config, "model_type", None) == "step3p5":
        return _step3p5(config)
    return _hf(config)


# ---- the peak --------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    seconds: float = 1.0,
    sizes: Sequence[int] = (512, 1024, 2048, 4096),
    device: str | torch.device = "cpu",
) -> float:
    """Measured matmul FLOP/s: square n x n matmuls (2 n^3 FLOPs) at each size, after one warm-up, with
    `torch.set_num_threads(threads)` (restored afterwards; None: the current setting); the fastest single
    matmul over all sizes. `seconds` is shared by the sizes, smallest first; a size whose warm-up and one
    timed run would not fit in what is left (predicted from the best rate so far) is skipped. It measures
    what the kernels reach: bf16 on a CPU without native bf16 is much slower than fp32."""
    dev = torch.device(device)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        order = sorted(sizes)
        start = time.perf_counter()
        best = 0.0
        for i, n in enumerate(order):
            flops = 2.0 * n**3
            if best > 0.0 and time.perf_counter() + 2 * flops / best > start + seconds:
                break
            a = torch.randn(n, n, device=dev).to(dtype)
            b = torch.randn(n, n, device=dev).to(dtype)
            out = torch.empty(n, n, device=dev, dtype=dtype)
            torch.mm(a, b, out=out)  # warm-up: kernel selection, page faults
            _sync(dev)
            until = start + seconds * (i + 1) / len(order)
            while True:
                t0 = time.perf_counter()
                torch.mm(a, b, out=out)
                _sync(dev)
                t1 = time.perf_counter()
                best = max(best, flops / max(t1 - t0, 1e-12))
                if t1 >= until:
                    break
        return best
    finally:
        torch.set_num_threads(previous)


# ---- utilisation -----------------------------------------------------------------------------------


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model-FLOPs utilisation: achieved FLOP/s (`flops` / `seconds`) as a fraction of `peak` FLOP/s; NaN
    when seconds or peak is not positive."""
    if seconds <= 0.0 or peak <= 0.0:
        return float("nan")
    return flops / seconds / peak


def learner_flops(
    flops: FlopsPerToken, row_lengths: Sequence[int], *, old_logprobs: bool = False, reference: bool = False
) -> float:
    """Model FLOPs of one learner step over rows of these real lengths (prompt + response, no padding):
    forward + backward (3 x forward) of every row (each row trains once a step, in one of the
    mini-batches), plus one forward for a separate pi_old pass (`old_logprobs`) and one for the frozen
    KL reference (`reference`). The critic's passes are not counted."""
    forwards = TRAIN_MULTIPLIER + float(old_logprobs) + float(reference)
    return forwards * flops.sequences_forward(row_lengths)


def generation_seconds(rollouts: Sequence[Rollout]) -> float:
    """Seconds the rollout workers spent generating these rollouts: the length of the union of their calls'
    wall-clock spans (`Rollout.generated_between`), so workers running at once count once, and in async
    mode the driver's wait for a batch that was ready long ago does not stand in for it. NaN when a
    rollout carries no span."""
    spans = [r.generated_between for r in rollouts]
    if not spans or any(s is None for s in spans):
        return float("nan")
    total, end = 0.0, -math.inf
    for lo, hi in sorted(s for s in spans if s is not None):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def step_perf(
    flops: FlopsPerToken,
    row_lengths: Sequence[int],
    train_seconds: float,
    peak_flops: float,
    generated_tokens: int,
    generate_seconds: float,
    *,
    old_logprobs_seconds: float | None = None,
    reference: bool = False,
) -> dict[str, float]:
    """One step's utilisation metrics.

    - `perf/learner_tflops`: the learner's model FLOPs (`learner_flops`) per second of `train_seconds`
      (+ `old_logprobs_seconds`, when that separate forward ran; None: it did not), in TFLOP/s;
    - `perf/mfu`: the same as a fraction of `peak_flops` (the whole learner's: per-rank peak x ranks);
    - `perf/rollout_tokens_per_s`: `generated_tokens` / `generate_seconds`.
    """
    seconds = train_seconds + (old_logprobs_seconds or 0.0)
    total = learner_flops(
        flops, row_lengths, old_logprobs=old_logprobs_seconds is not None, reference=reference
    )
    return {
        "perf/mfu": mfu(total, seconds, peak_flops),
        "perf/learner_tflops": total / seconds / 1e12 if seconds > 0.0 else float("nan"),
        "perf/rollout_tokens_per_s": generated_tokens / generate_seconds
        if generate_seconds > 0  # False for NaN too
        else float("nan"),
    }
