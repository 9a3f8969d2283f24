"""The `tiny_dense` builder: tiny()'s attention with a dense SwiGLU MLP in every layer (no MoE layer), as many
active parameters per token as tiny(), served by vLLM with the log-probs of rlstack's PyTorch model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlstack.model import BUILDERS, Step3p5ForCausalLM, init_checkpoint
from rlstack.rollout.parity import synthetic_prompts


def _shapes(name: str) -> Step3p5ForCausalLM:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return Step3p5ForCausalLM(BUILDERS[name]())


def _active_parameters(model: Step3p5ForCausalLM) -> float:
    """Parameters one token passes through: the routed experts count top_k of num_experts."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    routed = sum(
        p.numel() for n, p in model.named_parameters() if ".moe." in n and not n.endswith("gate.weight")
    )
    return total - routed * (1 - cfg.moe_top_k / cfg.moe_num_experts)


def test_tiny_dense_has_no_moe_layer_and_tinys_active_parameters() -> None:
    dense, moe = _shapes("tiny_dense"), _shapes("tiny")
    assert dense.config.moe_layer_ids == [] and dense.config.moe_layers_enum == ""
    assert not any(layer.is_moe for layer in dense.model.layers)
    assert all(hasattr(layer, "mlp") and not hasattr(layer, "moe") for layer in dense.model.layers)
    total = sum(p.numel() for p in dense.parameters())
    assert total == _active_parameters(dense) == 1_457_344  # the numbers in tiny_dense's docstring
    assert _active_parameters(moe) == 1_461_952
    assert abs(total / _active_parameters(moe) - 1) < 0.01
    # the same attention and layout as tiny(): only the FFN differs
    ffn_keys = {"intermediate_size", "moe_layers_enum"}
    a, b = dense.config.to_dict(), moe.config.to_dict()
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == ffn_keys


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Peaked weights (std 0.2, like tests/conftest.py's tiny_checkpoint): a wrong window, norm or MLP moves
    log-probs by whole nats, not by 1e-6 on a near-uniform model."""
    config = BUILDERS["tiny_dense"]()
    config.initializer_range = 0.2
    return init_checkpoint(config, tmp_path_factory.mktemp("tiny_dense"), seed=0)


@pytest.mark.vllm
def test_vllm_serves_tiny_dense_with_pytorchs_logprobs(dense_checkpoint: Path) -> None:
    """Prompt tokens (vLLM prompt_logprobs) and sampled tokens (logprobs) of 8 sequences longer than the
    sliding window: vLLM in fp32 and Step3p5ForCausalLM agree to 1e-3 on every token."""
    from vllm import SamplingParams

    from rlstack.rollout.engine import EngineSettings, close_llm, make_llm

    llm = make_llm(dense_checkpoint, EngineSettings(kv_cache_mb=16))
    try:
        params = SamplingParams(
            temperature=1.0, max_tokens=24, logprobs=0, prompt_logprobs=0, seed=0, ignore_eos=True
        )
        outputs = llm.generate(synthetic_prompts(8, seed=3), params, use_tqdm=False)
    finally:
        close_llm(llm)

    model = Step3p5ForCausalLM.from_pretrained(dense_checkpoint, dtype=torch.float32).eval()
    worst, longest, tokens = 0.0, 0, 0
    for out in outputs:
        prompt = list(out.prompt_token_ids or [])
        completion = out.outputs[0]
        assert out.prompt_logprobs is not None and completion.logprobs is not None
        ids = prompt + list(completion.token_ids)
        # logprobs=0 / prompt_logprobs=0: exactly the given token's log-prob at each position
        vllm_lp = [next(iter(p.values())).logprob for p in out.prompt_logprobs[1:]]  # position 0: None
        vllm_lp += [next(iter(p.values())).logprob for p in completion.logprobs]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()  # (L - 1, V)
        ours = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        worst = max(worst, (ours - torch.tensor(vllm_lp)).abs().max().item())
        longest, tokens = max(longest, len(ids)), tokens + len(ids) - 1
    assert tokens > 8 * 24
    assert longest > model.config.sliding_window  # the sliding layers' window was exercised
    assert worst < 1e-3, worst


def test_routing_replay_is_refused_for_a_dense_policy(dense_checkpoint: Path, tiny_checkpoint: Path) -> None:
    from rlstack.driver import check_routing_replay

    with pytest.raises(ValueError, match="has no MoE layers"):
        check_routing_replay(dense_checkpoint, "rollout")
    check_routing_replay(dense_checkpoint, "off")
    check_routing_replay(tiny_checkpoint, "old")
