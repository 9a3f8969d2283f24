"""rlstack.scaling: the GPU configs fit, the oversized one fails loudly, and the formulas check by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlstack.config_base import ConfigError
from rlstack.scaling import (
    BEGIN,
    END,
    Architecture,
    Params,
    check,
    count_params,
    kv_bytes,
    learner_memory,
    load,
    main,
    write_markdown,
)

REPO = Path(__file__).parents[2]
GPU_CONFIGS = sorted((REPO / "configs" / "gpu").glob("*.yaml"))
OVERSIZED = REPO / "tests" / "fixtures" / "scaling" / "oversized.yaml"  # deliberately too big


def test_there_are_gpu_configs() -> None:
    assert OVERSIZED.is_file() and len(GPU_CONFIGS) >= 2


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_every_gpu_config_fits(path: Path) -> None:
    report = check(path)
    assert report.problems == []
    assert all(mark != "FAIL" for _, _, mark in report.rows)


def test_the_oversized_config_fails_naming_what_and_by_how_much(capsys: pytest.CaptureFixture[str]) -> None:
    problems = check(OVERSIZED).problems
    learner = next(p for p in problems if p.startswith("learner GPU memory"))
    assert "over by" in learner and "bf16 weights 366.9 GiB" in learner and "has 140.0 GiB" in learner
    assert any(p.startswith("rollout GPU memory") and "over by" in p for p in problems)
    assert main([str(OVERSIZED)]) == 1
    assert "FAIL learner GPU memory: needs" in capsys.readouterr().out


def test_the_good_configs_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(p) for p in GPU_CONFIGS if p != OVERSIZED]) == 0
    assert "fits" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "total_b", "active_b", "with_embeddings"),
    [("qwen3-30b-a3b.yaml", 30.5, 3.3, True), ("step3p5-flash.yaml", 196.81, 11.0, False)],
)
def test_parameter_counts_match_the_published_ones(
    name: str, total_b: float, active_b: float, with_embeddings: bool
) -> None:
    p = count_params(load(REPO / "configs" / "gpu" / name).arch)
    active = p.active if with_embeddings else p.active_nonembed
    assert p.total / 1e9 == pytest.approx(total_b, rel=0.03)
    assert active / 1e9 == pytest.approx(active_b, rel=0.03)


def test_step_mtp_layer_is_the_published_head() -> None:
    """Step 3.5 Flash's model card: 196.81B = 196B backbone + a 0.81B head (one MTP layer)."""
    arch = load(REPO / "configs" / "gpu" / "step3p5-flash.yaml").arch.model_copy(update={"mtp_layers": 1})
    assert count_params(arch).mtp / 1e9 == pytest.approx(0.81, abs=0.005)


def llama2_7b() -> Architecture:
    return Architecture(
        source="Llama-2-7b config.json", vocab_size=32000, hidden_size=4096, num_layers=32, heads=32,
        kv_heads=32, head_dim=128, qk_norm=False, intermediate_size=11008,
    )  # fmt: skip


def test_a_dense_model_counts_exactly() -> None:
    """Llama-2-7B has 6,738,415,616 parameters: embedding and LM head 32000 x 4096 each, and per layer
    4 x 4096^2 (attention) + 3 x 4096 x 11008 (MLP) + 2 x 4096 (norms), plus the final norm."""
    p = count_params(llama2_7b())
    assert p.total == 6_738_415_616
    assert p.active == p.total


def test_zero3_dense_7b_on_8_gpus_by_hand() -> None:
    """A dense 7B model, ZeRO-3 over 8 GPUs: every per-parameter state is 1/8 per GPU."""
    plan = load(REPO / "configs" / "gpu" / "qwen3-30b-a3b.yaml")
    plan.arch = llama2_7b()
    plan.cfg.learner.num_ranks, plan.cfg.learner.zero_stage = 8, 3
    plan.cfg.learner.offload_optimizer = False
    params = Params(total=7e9, active=7e9, active_nonembed=7e9, mtp=0, largest_unit=0, embedding=0)
    gpu, host = learner_memory(plan, params)
    assert gpu["fp32 master + Adam m, v"] == 7e9 * 12 / 8
    assert gpu["bf16 weights"] == gpu["bf16 grads"] == 7e9 * 2 / 8
    assert host == {}
    plan.cfg.learner.offload_optimizer = True  # the optimizer state moves to the host, still 1/8 per rank
    gpu, host = learner_memory(plan, params)
    assert "fp32 master + Adam m, v" not in gpu and host["fp32 master + Adam m, v"] == 7e9 * 12 / 8
    plan.cfg.learner.zero_stage, plan.cfg.learner.offload_optimizer = 1, False  # ZeRO-1 shards only that
    gpu, _ = learner_memory(plan, params)
    assert (
        gpu["bf16 weights"] == gpu["bf16 grads"] == 7e9 * 2 and gpu["fp32 master + Adam m, v"] == 7e9 * 12 / 8
    )


def test_kv_cache_sliding_layers_hold_only_the_window() -> None:
    a = load(REPO / "configs" / "gpu" / "step3p5-flash.yaml").arch  # 12 full + 33 sliding layers, 8 kv heads
    per_token_layer = 2 * 8 * 128 * 2  # K and V, bf16
    assert kv_bytes(a, 10_000, tp=1) == per_token_layer * (12 * 10_000 + 33 * 512)
    assert kv_bytes(a, 100, tp=1) == per_token_layer * 45 * 100
    assert kv_bytes(a, 10_000, tp=8) == kv_bytes(a, 10_000, tp=1) / 8  # one kv head per GPU


def test_markdown_keeps_the_prose_around_the_tables(tmp_path: Path) -> None:
    out = tmp_path / "scaling.md"
    out.write_text(f"# Title\n\nprose before\n\n{BEGIN}\nold tables\n{END}\n\nprose after\n")
    assert main([str(GPU_CONFIGS[0]), str(OVERSIZED), "--markdown", str(out)]) == 1
    text = out.read_text()
    assert text.startswith("# Title\n\nprose before") and text.endswith("prose after\n")
    assert "old tables" not in text and "**Does not fit:**" in text
    write_markdown(out, "new")
    assert "prose after" in out.read_text()


def test_extra_sections_are_validated(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(OVERSIZED.read_text().replace("gpus_per_node: 8", "gpus_per_nod: 8"))
    with pytest.raises(ConfigError, match="gpus_per_nod"):
        load(bad)
    assert main([str(bad)]) == 2
