"""Checkpoints round-trip exactly and load through transformers' Auto classes; HF generate works."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import rlstack.model  # noqa: F401  (registers the Auto classes)
from rlstack.model import Step3p5ForCausalLM

VLLM_NAMES = [
    "model.layers.1.moe.gate.weight",
    "model.layers.1.moe.router_bias",
    "model.layers.1.moe.gate_proj.weight",
    "model.layers.1.moe.up_proj.weight",
    "model.layers.1.moe.down_proj.weight",
    "model.layers.1.share_expert.gate_proj.weight",
    "model.layers.1.self_attn.g_proj.weight",
    "model.layers.1.self_attn.q_norm.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def test_checkpoint_uses_vllm_names_and_layouts(tiny_checkpoint: Path) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "step3p5"
    assert config["architectures"] == ["Step3p5ForCausalLM"]
    with safe_open(tiny_checkpoint / "model.safetensors", "pt") as f:
        names = set(f.keys())
        E, inner, H = config["moe_num_experts"], config["moe_intermediate_size"], config["hidden_size"]
        assert f.get_slice("model.layers.1.moe.gate_proj.weight").get_shape() == [E, inner, H]
        assert f.get_slice("model.layers.1.moe.down_proj.weight").get_shape() == [E, H, inner]
    assert set(VLLM_NAMES) <= names


def test_save_load_round_trip_is_exact(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    assert isinstance(model, Step3p5ForCausalLM)
    ids = torch.randint(0, 128, (2, 20))
    before = model(ids).logits
    model.save_pretrained(tmp_path / "again")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert torch.equal(reloaded(ids).logits, before)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_tokenizer_round_trips_task_text(tiny_checkpoint: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    text = "Solve for x: 3*x-7=(12/4)^2. Answer: \\boxed{16/3}"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    assert len(ids) < len(text)  # `Solve`, `for`, `Answer`, `\boxed` are single tokens
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|user|>1+1?<|assistant|>"
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0


def test_generate_with_cache_and_left_padding_matches_plain_greedy(tiny_checkpoint: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    long_prompt = torch.randint(4, 128, (1, 40))  # longer than the sliding window (32) once generating
    short_prompt = torch.randint(4, 128, (1, 9))
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    solo_long = model.generate(long_prompt, use_cache=False, **kw)
    assert torch.equal(model.generate(long_prompt, use_cache=True, **kw), solo_long)
    solo_short = model.generate(short_prompt, use_cache=True, **kw)
    padded = torch.cat([torch.zeros(1, 31, dtype=torch.long), short_prompt], dim=1)
    batch = torch.cat([padded, long_prompt])
    mask = (torch.arange(40)[None] >= torch.tensor([[31], [0]])).long()
    out = model.generate(batch, attention_mask=mask, use_cache=True, **kw)
    assert torch.equal(out[0, 40:], solo_short[0, 9:])
    assert torch.equal(out[1, 40:], solo_long[0, 40:])
