"""The `medium` builder (benchmarks/vs_trl.py): about 30M parameters in the Step 3.5 Flash layout."""

from __future__ import annotations

import torch

from rlstack.model import BUILDERS, Step3p5ForCausalLM
from rlstack.model.configuration import FULL, SLIDING


def _model() -> Step3p5ForCausalLM:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return Step3p5ForCausalLM(BUILDERS["medium"]())


def test_medium_has_about_30m_parameters_and_half_of_them_inactive_per_token() -> None:
    model = _model()
    total = sum(p.numel() for p in model.parameters())
    assert 28e6 <= total <= 32e6, total
    cfg = model.config
    routed = sum(
        p.numel() for n, p in model.named_parameters() if ".moe." in n and not n.endswith("gate.weight")
    )
    active = total - routed * (1 - cfg.moe_top_k / cfg.moe_num_experts)
    assert 12e6 <= active <= 16e6, active


def test_medium_keeps_the_step35_layout() -> None:
    cfg = BUILDERS["medium"]()
    assert cfg.layer_types == [FULL, SLIDING, SLIDING, SLIDING] * 2
    assert cfg.attention_other_setting["num_attention_heads"] > cfg.num_attention_heads  # more sliding heads
    assert cfg.num_attention_groups > 1  # GQA, which vLLM's Step3p5 needs
    assert cfg.use_head_wise_attn_gate
    assert cfg.moe_layers_enum == "1,2,3,4,5,6,7"  # layer 0 dense, the rest routed + shared experts
    assert cfg.moe_num_experts == 8 and cfg.moe_top_k == 2 and cfg.share_expert_dim > 0
    model = _model()
    assert not hasattr(model.model.layers[0], "moe")
    assert all(hasattr(layer, "moe") and hasattr(layer, "share_expert") for layer in model.model.layers[1:])


def test_every_builder_is_selectable_from_config_and_cli() -> None:
    from typing import get_args

    from rlstack.config import BuilderName, load_config

    assert set(get_args(BuilderName)) == set(BUILDERS)
    assert load_config(None, ["model.builder=medium"]).model.builder == "medium"
