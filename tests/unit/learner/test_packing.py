"""Packed scoring (rlstack.learner.packing, `score_tokens(pack=True)`): the sequences of a right-padded batch
laid end to end give the unpacked log-probs, entropy, routing and gradients to 1e-5, on our Step3p5 (MoE,
sliding-window layers with sequences longer than the window) and on transformers' models (dense with a
sliding window, MoE with router hooks), with fewer padded positions computed."""

from __future__ import annotations

import random

import pytest
import torch

from rlstack.learner.logprobs import score_tokens
from rlstack.learner.packing import first_fit_decreasing, pack
from rlstack.model import BUILDERS, init_checkpoint
from rlstack.model.auto import load_causal_lm

TOL = 1e-5


def _ragged(lengths: list[int], vocab: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows (B, T) of the given lengths."""
    rng = random.Random(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.tensor([rng.randrange(4, vocab) for _ in range(n)])
        mask[r, :n] = 1
    return ids, mask


# Longest 80 > the tiny model's sliding window (32); short ones pack three or four to a row.
LENGTHS = [80, 12, 33, 7, 61, 19, 25, 5, 40, 9, 1, 70]


def test_first_fit_decreasing_fills_rows_without_overflow() -> None:
    bins = first_fit_decreasing(LENGTHS, 80)
    assert sorted(i for b in bins for i in b) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in b) <= 80 for b in bins)
    assert len(bins) == 5 < len(LENGTHS)  # 362 tokens in 5 rows of 80 instead of 12


def test_pack_and_unpack_round_trip() -> None:
    ids, mask = _ragged(LENGTHS)
    rows = pack(ids, mask)
    assert rows.input_ids.shape == (5, 80) and int(rows.token_mask.sum()) == sum(LENGTHS)
    assert torch.equal(rows.unpack(rows.input_ids), ids * mask)  # every token back in its place
    assert torch.equal(rows.pack(ids), torch.where(rows.token_mask, rows.input_ids, 0))
    # positions restart at 0 for each sequence
    assert torch.equal(rows.unpack(rows.position_ids)[mask.bool()], (mask.cumsum(-1) - 1)[mask.bool()])
    left = mask.flip(-1)
    with pytest.raises(ValueError, match="row 1's real tokens are not a prefix"):
        pack(ids, left)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.nn.Module]:
    out = {}
    for name in ("tiny", "tiny_qwen3_moe", "tiny_llama"):
        config = BUILDERS[name]()
        config.initializer_range = 0.2
        if name == "tiny_llama":  # transformers' Mistral: Llama attention plus a sliding window
            config = _mistral(config)
        out[name] = load_causal_lm(init_checkpoint(config, tmp_path_factory.mktemp(name), seed=0)).float()
    return out


def _mistral(llama_config):  # type: ignore[no-untyped-def]
    from transformers import MistralConfig

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "initializer_range")  # fmt: skip
    return MistralConfig(**{k: getattr(llama_config, k) for k in keys}, sliding_window=16, head_dim=None)


def _compare(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, replay: torch.Tensor | None
) -> None:
    real = mask.bool()
    out = {}
    for packed in (False, True):
        model.zero_grad()
        scores = score_tokens(model, ids, mask, pack=packed, routed_experts=replay, chunk_tokens=0)
        (scores.logp * real).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[packed] = (scores, grads)
    (plain, g_plain), (packed, g_packed) = out[False], out[True]
    assert plain.entropy is not None and packed.entropy is not None
    assert float((plain.logp - packed.logp)[real].abs().max()) <= TOL
    assert float(packed.logp[~real].abs().max()) == 0.0 and float(packed.logp[:, 0].abs().max()) == 0.0
    assert float((plain.entropy - packed.entropy)[real].abs().max()) <= TOL
    assert g_plain.keys() == g_packed.keys() and len(g_plain) > 0
    scale = max(float(g.abs().max()) for g in g_plain.values())
    assert max(float((g_plain[n] - g_packed[n]).abs().max()) for n in g_plain) <= TOL * max(scale, 1.0)
    if plain.router_stats is None:
        assert packed.router_stats is None
        return
    assert packed.router_stats is not None and packed.expert_ids is not None and plain.expert_ids is not None
    assert torch.equal(plain.expert_ids[real], packed.expert_ids[real])
    assert plain.routing_confidence is not None and packed.routing_confidence is not None
    assert float((plain.routing_confidence - packed.routing_confidence)[real].abs().max()) <= TOL
    flat = real.reshape(-1)  # (B*T,)
    for a, b in zip(plain.router_stats, packed.router_stats, strict=True):
        assert torch.equal(a.expert_counts, b.expert_counts)  # padding routed nowhere
        assert torch.equal(a.ids[flat], b.ids[flat])
        assert float((a.entropy - b.entropy)[flat].abs().max()) <= TOL
        assert float((a.mean_score - b.mean_score).abs().max()) <= TOL


@pytest.mark.parametrize("name", ["tiny", "tiny_qwen3_moe", "tiny_llama"])
def test_packed_scores_equal_unpacked(models: dict[str, torch.nn.Module], name: str) -> None:
    ids, mask = _ragged(LENGTHS)
    _compare(models[name], ids, mask, replay=None)


@pytest.mark.parametrize("name", ["tiny", "tiny_qwen3_moe"])
def test_packed_routing_replay_equals_unpacked(models: dict[str, torch.nn.Module], name: str) -> None:
    """Replayed experts travel with their tokens into the packed rows."""
    model = models[name]
    ids, mask = _ragged(LENGTHS, seed=1)
    with torch.no_grad():
        free = score_tokens(model, ids, mask, pack=False, with_entropy=False).expert_ids
    assert free is not None  # (B, T, n_moe_layers, k)
    replay = torch.roll(free, shifts=1, dims=-1)  # other experts than the router's own order
    replay[:, ::3] = -1  # and some positions route freely
    _compare(model, ids, mask, replay=replay)
