"""The tiny Step3p5 model has the Step 3.5 Flash structure and routes exactly as specified."""

from __future__ import annotations

import pytest
import torch

from rlstack.model import Step3p5Config, Step3p5ForCausalLM, tiny
from rlstack.model.configuration import FULL, SLIDING


@pytest.fixture(scope="module")
def model() -> Step3p5ForCausalLM:
    torch.manual_seed(0)
    config = tiny()
    config.initializer_range = 0.2
    return Step3p5ForCausalLM(config).eval()


def test_layer_pattern_is_three_sliding_to_one_full() -> None:
    config = Step3p5Config(num_hidden_layers=8)
    assert config.layer_types == [FULL, SLIDING, SLIDING, SLIDING] * 2
    model = Step3p5ForCausalLM(tiny())
    windows = [layer.self_attn.sliding_window for layer in model.model.layers]
    assert windows == [None, 32, 32, 32]


def test_every_head_has_its_own_gate(model: Step3p5ForCausalLM) -> None:
    for layer_idx, layer in enumerate(model.model.layers):
        heads, _, _ = model.config.attention_shape(layer_idx)
        assert layer.self_attn.g_proj.weight.shape == (heads, model.config.hidden_size)
    # sliding layers carry more query heads than full ones (attention_other_setting), as in Step 3.5
    assert model.model.layers[0].self_attn.num_heads == 4
    assert model.model.layers[1].self_attn.num_heads == 8


def test_head_gate_changes_only_its_own_head(model: Step3p5ForCausalLM) -> None:
    attn = model.model.layers[1].self_attn
    x = torch.randn(1, 5, model.config.hidden_size)
    pos = torch.arange(5)[None]
    captured = []
    hook = attn.o_proj.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].clone()))
    attn(x, pos, None, None)
    with torch.no_grad():
        attn.g_proj.weight[3] += 5.0  # open head 3's gate further
    attn(x, pos, None, None)
    with torch.no_grad():
        attn.g_proj.weight[3] -= 5.0
    hook.remove()
    before, after = (t.view(1, 5, attn.num_heads, attn.head_dim) for t in captured)
    changed = [h for h in range(attn.num_heads) if not torch.equal(before[..., h, :], after[..., h, :])]
    assert changed == [3]


def test_exactly_top_k_experts_per_token_and_shared_expert_sees_every_token(
    model: Step3p5ForCausalLM,
) -> None:
    ids = torch.randint(0, 128, (3, 11))
    seen_by_shared: list[int] = []
    hooks = [
        layer.share_expert.register_forward_hook(lambda mod, inp, out: seen_by_shared.append(inp[0].shape[0]))
        for layer in model.model.layers
        if layer.is_moe
    ]
    out = model(ids, output_router_stats=True)
    for h in hooks:
        h.remove()
    n_tokens, k = ids.numel(), model.config.moe_top_k
    assert seen_by_shared == [n_tokens] * 3  # the shared expert is always active, in every MoE layer
    assert out.expert_load.shape == (3, model.config.moe_num_experts)
    assert out.expert_load.sum(-1).tolist() == [n_tokens * k] * 3
    moe = model.model.layers[1].moe
    weights, experts, _ = moe.route(torch.randn(n_tokens, model.config.hidden_size))
    assert experts.shape == (n_tokens, k)
    assert all(len(set(row)) == k for row in experts.tolist())  # k distinct experts per token
    torch.testing.assert_close(weights.sum(-1), torch.ones(n_tokens))  # norm_expert_weight renormalises


def test_router_bias_steers_selection_but_not_weights(model: Step3p5ForCausalLM) -> None:
    moe = model.model.layers[1].moe
    x = torch.randn(7, model.config.hidden_size)
    with torch.no_grad():
        moe.router_bias[5] = 100.0  # expert 5 always selected...
        weights, experts, _ = moe.route(x)
        moe.router_bias.zero_()
    assert (experts == 5).any(-1).all()
    scores = torch.sigmoid(moe.gate(x))
    # ...yet its weight comes from the unbiased sigmoid score, renormalised over the chosen experts
    expected = scores.gather(1, experts) / scores.gather(1, experts).sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected)


def test_routing_confidence_is_selected_score_mass(model: Step3p5ForCausalLM) -> None:
    out = model(torch.randint(0, 128, (2, 6)), output_router_stats=True)
    assert out.routing_confidence.shape == (2, 6)
    # top-2 of 8 sigmoid scores: strictly between 2/8 (all equal) and 1
    assert (out.routing_confidence > 0.25).all() and (out.routing_confidence < 1).all()


def test_sliding_window_limits_what_a_layer_sees(model: Step3p5ForCausalLM) -> None:
    attn = model.model.layers[1].self_attn  # sliding, window 32
    mask = attn._mask(T=40, S=40, key_padding=None, device=torch.device("cpu"))[0, 0]
    assert mask[39].nonzero().flatten().tolist() == list(range(8, 40))  # the last 32 positions
    assert mask[5].nonzero().flatten().tolist() == list(range(6))  # causal inside the window
    full = model.model.layers[0].self_attn._mask(T=40, S=40, key_padding=None, device=torch.device("cpu"))
    assert full[0, 0, 39].all()


def test_unsupported_config_is_refused_with_the_key_named() -> None:
    with pytest.raises(ValueError, match="moe_router_activation='softmax'"):
        Step3p5ForCausalLM(Step3p5Config(moe_router_activation="softmax"))
    with pytest.raises(ValueError, match="num_attention_groups must be > 1"):
        Step3p5ForCausalLM(Step3p5Config(num_attention_groups=1))


def test_backbone_takes_hf_keywords_and_exposes_last_hidden_state(model: Step3p5ForCausalLM) -> None:
    """TRL scores completions with `model.base_model(ids, attention_mask=..., use_cache=False)
    .last_hidden_state` and its own LM head: that must reproduce our logits."""
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    attn = torch.ones_like(ids)
    with torch.no_grad():
        out = model.base_model(input_ids=ids, attention_mask=attn, use_cache=False, return_dict=True)
        hidden, stats = out  # still unpacks like the plain tuple the rest of the code uses
        assert out.last_hidden_state is hidden and len(stats) == 3
        logits = model(input_ids=ids, attention_mask=attn).logits
    torch.testing.assert_close(model.lm_head(out.last_hidden_state), logits, rtol=0, atol=0)


def test_rope_builds_its_frequencies_on_the_positions_device() -> None:
    """On a GPU the positions are CUDA tensors: RoPE's frequencies must be made there, not on the CPU (a 1-D
    CPU tensor times a CUDA tensor is a device error). The meta device shows the same mismatch on a CPU."""
    from rlstack.model.modeling import apply_neox_rope

    x = torch.empty(1, 2, 3, 8, device="meta")  # (B, H, T, D)
    positions = torch.zeros(1, 3, dtype=torch.long, device="meta")
    out = apply_neox_rope(x, positions, rotary_dim=4, theta=10000.0)
    assert out.device.type == "meta" and out.shape == x.shape
