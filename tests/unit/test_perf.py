"""rlstack.perf: model FLOPs per token against torch's FlopCounterMode on the built models, the MFU
arithmetic, and the matmul peak measurement.

FlopCounterMode counts matmuls (aten.mm/bmm) as executed. Under the math SDPA backend (the CPU flash kernel
has no FLOP formula, so attention would be missing) attention is two bmms over the FULL T x T score matrix
(masked, not skipped), so the counter equals our formula at context T for sequences no longer than the
sliding window; model FLOPs count only the attended keys (causal: (T + 1) / 2 on average)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from rlstack.model import BUILDERS
from rlstack.perf import (
    FlopsPerToken,
    attended_keys,
    generation_seconds,
    learner_flops,
    measure_peak_flops,
    mfu,
    model_flops_per_token,
    step_perf,
)
from rlstack.types import Rollout

B, T = 2, 16


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """FLOP counts do not depend on threads; tiny ops on two threads of a busy machine can be 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BUILDERS[name]()
    if config.model_type == "step3p5":
        from rlstack.model.modeling import Step3p5ForCausalLM

        return Step3p5ForCausalLM(config).float()
    from transformers import AutoModelForCausalLM

    # eager experts: a loop over the experts that got tokens (top-k exactly); the default grouped_mm has no
    # FLOP formula, so FlopCounterMode would not see the routed experts at all
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, experts_implementation="eager")


def _count(model: torch.nn.Module, ids: torch.Tensor, backward: bool = False) -> dict[str, int]:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(ids).logits
        if backward:
            logits.float().square().mean().backward()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("name", ["tiny", "tiny_dense", "tiny_llama", "tiny_qwen3", "tiny_qwen3_moe"])
def test_forward_flops_equal_flop_counter(name: str) -> None:
    model = _build(name)
    fpt = model_flops_per_token(model.config)
    assert min(a.window or T for a in fpt.attention) >= T  # the dense kernel's T x T is what we count
    counted = _count(model, torch.randint(4, 128, (B, T)))
    assert counted["aten.mm"] == 2 * fpt.matmul_params * B * T  # projections, experts, router, lm_head
    assert counted["aten.bmm"] == B * T * (fpt.forward(T) - 2 * fpt.matmul_params)  # scores + values
    # model FLOPs of a causal sequence: fewer attended keys than the kernel's full square
    causal = fpt.sequences_forward([T] * B)
    assert (
        causal == B * T * 2 * fpt.matmul_params + (fpt.forward(T) - 2 * fpt.matmul_params) * B * (T + 1) / 2
    )


def test_training_counts_three_forwards() -> None:
    model = _build("tiny")
    ids = torch.randint(4, 128, (B, T))
    forward = sum(_count(model, ids).values())
    assert sum(_count(model, ids, backward=True).values()) == 3 * forward


def test_step3p5_layout_and_builder_sizes() -> None:
    tiny = model_flops_per_token(BUILDERS["tiny"]())
    # layer 0 full (4 heads x 32), layers 1-3 sliding (8 heads x 32, window 32)
    assert [(a.width, a.window) for a in tiny.attention] == [(128, None)] + [(256, 32)] * 3
    assert tiny.breakdown["dense_mlp"] == 3 * 192 * 512  # layer 0
    assert tiny.breakdown["routed_experts"] == 3 * 2 * 3 * 192 * 128  # layers 1-3, top-2
    assert tiny.breakdown["router"] == 3 * 192 * 8
    # tiny_dense matches tiny's active FFN width by construction (builders.tiny_dense), routers aside
    dense = model_flops_per_token(BUILDERS["tiny_dense"]())
    assert dense.matmul_params == tiny.matmul_params - tiny.breakdown["router"]
    # medium: "about 30M parameters, about 14M active per token" (embedding and norms aside)
    assert model_flops_per_token(BUILDERS["medium"]()).matmul_params == 14_298_624


def test_dense_matmul_params_are_the_linear_weights() -> None:
    model = _build("tiny_dense")
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model_flops_per_token(model.config).matmul_params == linear


def test_sliding_window_caps_the_attended_keys() -> None:
    assert attended_keys(4) == 10 and attended_keys(4, window=8) == 10
    assert attended_keys(64, window=32) == 32 * 33 // 2 + 32 * 32
    fpt = model_flops_per_token(BUILDERS["tiny"]())
    base = 2 * fpt.matmul_params
    assert fpt.forward(100) - base == 4 * (128 * 100 + 3 * 256 * 32)
    assert fpt.train(10) == 3 * fpt.forward(10)


def test_hf_moe_and_window_configs() -> None:
    from transformers import MistralConfig, MixtralConfig, Qwen2MoeConfig

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    common |= dict(num_key_value_heads=2, vocab_size=100)
    attn = 64 * 16 * (2 * 4 + 2 * 2)
    mixtral = model_flops_per_token(MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))
    assert mixtral.matmul_params == 2 * (attn + 64 * 4 + 2 * 3 * 64 * 128) + 64 * 100
    qwen2_moe = Qwen2MoeConfig(
        **common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, mlp_only_layers=[0],
    )  # fmt: skip
    moe_layer = 64 * 4 + 64 + 2 * 3 * 64 * 32 + 3 * 64 * 48  # router + shared gate + top-2 + shared
    assert model_flops_per_token(qwen2_moe).matmul_params == 2 * attn + 3 * 64 * 128 + moe_layer + 64 * 100
    mistral = model_flops_per_token(MistralConfig(**common, sliding_window=8))
    assert [a.window for a in mistral.attention] == [8, 8]


def test_mfu_arithmetic() -> None:
    assert mfu(1e12, 2.0, 1e12) == 0.5
    assert math.isnan(mfu(1.0, 0.0, 1.0)) and math.isnan(mfu(1.0, 1.0, 0.0))
    fpt = FlopsPerToken(matmul_params=1000, attention=(), breakdown={})
    assert learner_flops(fpt, [10, 20]) == 3 * 2000 * 30
    assert learner_flops(fpt, [10], old_logprobs=True, reference=True) == 5 * 2000 * 10
    out = step_perf(fpt, [10, 20], 2.0, 1e5, 300, 3.0, old_logprobs_seconds=1.0)
    total = 4 * 2000 * 30  # train + the separate pi_old forward
    assert out == {
        "perf/mfu": pytest.approx(total / 3.0 / 1e5),
        "perf/learner_tflops": pytest.approx(total / 3.0 / 1e12),
        "perf/rollout_tokens_per_s": 100.0,
    }


def test_generation_seconds_is_the_union_of_the_calls_spans() -> None:
    """Two workers' calls overlapping count once; a gap between calls (the driver waiting, or dynamic
    sampling scoring a round) does not count; a rollout without a span makes the figure NaN, not a guess."""

    def rollout(span: tuple[float, float] | None) -> Rollout:
        return Rollout("p", [1], [2], [-0.1], "stop", 0, generated_between=span)

    calls = [(100.0, 103.0), (101.0, 104.0), (110.0, 112.0), (100.5, 102.0)]
    assert generation_seconds([rollout(s) for s in calls for _ in range(3)]) == pytest.approx(4.0 + 2.0)
    assert math.isnan(generation_seconds([rollout((0.0, 1.0)), rollout(None)]))
    assert math.isnan(generation_seconds([]))


def test_measure_peak_flops_is_quick_and_restores_threads() -> None:
    threads = torch.get_num_threads()
    start = time.perf_counter()
    peak = measure_peak_flops(torch.float32, threads=2, seconds=0.3, sizes=(64, 128, 256))
    assert time.perf_counter() - start < 3.0
    assert math.isfinite(peak) and peak > 0.0
    assert torch.get_num_threads() == threads
