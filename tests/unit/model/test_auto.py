"""Any transformers causal LM as the policy (rlstack.model.auto, router_hooks, learner.lora): loading, the
architecture check, checkpoint names, routing statistics and replay on transformers' MoE classes, activation
checkpointing and the LoRA merge. Plain PyTorch on tiny random models, no engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlstack.learner.config import LoRAConfig
from rlstack.learner.lora import apply_lora, linear_targets, lora_scaling, merged_state
from rlstack.model import BUILDERS, init_checkpoint
from rlstack.model.auto import (
    UnsupportedModelError,
    check_architecture,
    checkpoint_state,
    load_causal_lm,
    moe_block_classes,
    moe_layer_ids,
    replay_support,
)

ARCHS = ["tiny", "tiny_llama", "tiny_qwen3", "tiny_qwen3_moe"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name in ARCHS:
        config = BUILDERS[name]()
        config.initializer_range = 0.2
        out[name] = init_checkpoint(config, tmp_path_factory.mktemp(name), seed=0)
    return out


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (2, 9), generator=gen)  # (B, T)
    attn = torch.ones_like(ids)
    attn[1, 6:] = 0  # right padding
    return ids, attn


@pytest.mark.parametrize("name", ARCHS)
def test_every_architecture_loads_and_leaves_under_its_checkpoint_names(
    name: str, checkpoints: dict[str, Path]
) -> None:
    path = checkpoints[name]
    assert check_architecture(path).endswith("ForCausalLM")
    model = load_causal_lm(path)
    on_disk = load_file(str(path / "model.safetensors"))  # (Qwen3-MoE: one tensor per expert)
    named = checkpoint_state(model, model.state_dict())  # (Qwen3-MoE: fused (E, 2I, H) in memory)
    assert named.keys() == on_disk.keys()
    assert [k for k in on_disk if not torch.equal(named[k], on_disk[k])] == []


def test_moe_blocks_and_layers_are_found_for_zero3_and_health_metrics(checkpoints: dict[str, Path]) -> None:
    qwen_moe, llama, ours = (load_causal_lm(checkpoints[n]) for n in ("tiny_qwen3_moe", "tiny_llama", "tiny"))
    assert [c.__name__ for c in moe_block_classes(qwen_moe)] == ["Qwen3MoeSparseMoeBlock"]
    assert [c.__name__ for c in moe_block_classes(ours)] == ["Step3p5MoE"]
    assert moe_block_classes(llama) == []
    assert moe_layer_ids(qwen_moe) == (0, 1) and moe_layer_ids(ours) == (1, 2, 3)
    assert moe_layer_ids(llama) == ()
    assert replay_support(checkpoints["tiny_qwen3_moe"]) is None
    assert replay_support(checkpoints["tiny"]) is None
    assert "llama" in str(replay_support(checkpoints["tiny_llama"]))


def test_unsupported_architecture_is_refused_naming_it(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    config = json.loads((checkpoints["tiny_llama"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"architectures": ["FooForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match=r"FooForCausalLM.*transformers.*vLLM"):
        check_architecture(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"architectures": []}))
    with pytest.raises(UnsupportedModelError, match="no 'architectures'"):
        check_architecture(tmp_path)


def test_qwen3_moe_router_hooks_report_stats_and_replay(checkpoints: dict[str, Path]) -> None:
    model = load_causal_lm(checkpoints["tiny_qwen3_moe"])
    ids, attn = batch()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=attn).logits
        out = model(input_ids=ids, attention_mask=attn, output_router_stats=True)
        assert torch.equal(out.logits, plain)  # statistics change nothing
        assert out.expert_ids.shape == (2, 9, 2, 2) and out.routing_confidence.shape == (2, 9)
        # counts are over real tokens only: 9 + 6 tokens x top-2 per layer
        assert out.expert_load.sum(-1).tolist() == [30, 30]
        same = model(input_ids=ids, attention_mask=attn, routed_experts=out.expert_ids)
        assert torch.equal(same.logits, plain)  # replaying the router's own choice is the identity
        forced = torch.tensor([3, 5]).expand_as(out.expert_ids).clone()
        forced[0, 0] = -1  # -1: this token routes freely
        moved = model(input_ids=ids, attention_mask=attn, routed_experts=forced, output_router_stats=True)
    assert (moved.logits[1] - plain[1]).abs().max() > 1e-3
    assert torch.equal(moved.expert_ids[1], forced[1])
    assert torch.equal(moved.expert_ids[0, 0], out.expert_ids[0, 0])
    with pytest.raises(ValueError, match="routed_experts has shape"):
        model(input_ids=ids, attention_mask=attn, routed_experts=forced[:, :, :1])


def test_replay_keeps_the_router_gradient(checkpoints: dict[str, Path]) -> None:
    model = load_causal_lm(checkpoints["tiny_qwen3_moe"])
    ids, attn = batch()
    forced = torch.tensor([3, 5]).expand(2, 9, 2, 2).clone()
    model(input_ids=ids, attention_mask=attn, routed_experts=forced).logits.logsumexp(-1).sum().backward()
    router = model.model.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tiny", "tiny_qwen3_moe"])
def test_activation_checkpointing_gives_the_same_gradients(name: str, checkpoints: dict[str, Path]) -> None:
    grads = []
    for checkpointing in (False, True):
        model = load_causal_lm(checkpoints[name])
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids, attn = batch()
        out = model(input_ids=ids, attention_mask=attn, output_router_stats=True, use_cache=False)
        balance = sum(s.mean_score.pow(2).sum() for s in out.router_stats)  # through the recomputed router
        (out.logits.logsumexp(-1).mean() + balance).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].numel() == grads[1].numel() and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("name", ["tiny", "tiny_qwen3_moe", "tiny_llama"])
def test_lora_merge_equals_the_adapted_forward(name: str, checkpoints: dict[str, Path]) -> None:
    model = apply_lora(load_causal_lm(checkpoints[name]), LoRAConfig(r=4, alpha=8.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # the base is frozen
    assert not any("lm_head" in n or ".moe.gate." in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # B starts at 0: make the adapters matter
    ids, attn = batch()
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=attn).logits
        plain = load_causal_lm(checkpoints[name])
        plain.load_state_dict(merged_state(model.state_dict(), lora_scaling(model)))
        merged = plain(input_ids=ids, attention_mask=attn).logits
        base = load_causal_lm(checkpoints[name])(input_ids=ids, attention_mask=attn).logits
    assert (merged - adapted).abs().max() < 1e-4 < (base - adapted).abs().max()


def test_all_linear_skips_the_lm_head_and_step3p5_routers(checkpoints: dict[str, Path]) -> None:
    names = linear_targets(load_causal_lm(checkpoints["tiny"]))
    assert "lm_head" not in names and not any(n.endswith("moe.gate") for n in names)
    assert any(n.endswith("self_attn.q_proj") for n in names) and any("share_expert" in n for n in names)


def test_lora_on_fused_experts_is_refused(checkpoints: dict[str, Path]) -> None:
    model = load_causal_lm(checkpoints["tiny_qwen3_moe"])
    with pytest.raises(ValueError, match="fused expert / router parameters"):
        apply_lora(model, LoRAConfig(target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_the_other_hooked_moe_classes_report_and_replay(model_type: str, tmp_path: Path) -> None:
    from transformers import AutoConfig

    shapes = {k: v for k, v in BUILDERS["tiny_qwen3_moe"]().to_dict().items() if k in TINY_SHAPE_KEYS}
    experts = {"num_local_experts": 8} if model_type == "mixtral" else {"num_experts": 8}
    config = AutoConfig.for_model(
        model_type, **shapes, **experts, num_experts_per_tok=2, initializer_range=0.2, architectures=[]
    )
    if model_type == "qwen2_moe":
        config.moe_intermediate_size, config.shared_expert_intermediate_size = 64, 64
    path = init_checkpoint(config, tmp_path, seed=0)
    assert replay_support(path) is None
    model = load_causal_lm(path)
    assert moe_layer_ids(model) == (0, 1) and len(moe_block_classes(model)) == 1
    ids, attn = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, output_router_stats=True)
        same = model(input_ids=ids, attention_mask=attn, routed_experts=out.expert_ids)
    assert out.expert_load.sum(-1).tolist() == [30, 30] and torch.equal(same.logits, out.logits)
    named = checkpoint_state(model, model.state_dict())
    assert named.keys() == load_file(str(path / "model.safetensors")).keys()


TINY_SHAPE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
)  # fmt: skip
