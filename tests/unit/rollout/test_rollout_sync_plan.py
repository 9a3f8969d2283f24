"""Weight-sync planning without engines: units, digests, changed-only plans, buckets, packed buffers."""

from __future__ import annotations

import pickle
import threading

import pytest
import torch

from rlstack.model import Step3p5ForCausalLM, tiny
from rlstack.rollout.config import RolloutConfig
from rlstack.rollout.sync.broadcast import BroadcastBackend
from rlstack.rollout.sync.collective import (
    broadcast,
    bucket_from_wire,
    bucket_to_wire,
    check_transport,
    create_store,
    join_group,
    pack,
    unpack,
)
from rlstack.rollout.sync.plan import (
    ChangeTracker,
    TensorMeta,
    _device_digest,
    group_units,
    plan_buckets,
    tensor_digest,
    unit_of,
)
from rlstack.rollout.sync.push import make_backend


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return Step3p5ForCausalLM(tiny()).state_dict()


def test_units_keep_each_fused_vllm_module_whole() -> None:
    assert unit_of("model.layers.3.self_attn.q_proj.weight") == "model.layers.3.self_attn"
    assert unit_of("model.layers.3.self_attn.k_norm.weight") == "model.layers.3.self_attn"
    assert unit_of("model.layers.3.moe.router_bias") == "model.layers.3.moe"
    assert unit_of("model.layers.3.mlp.experts.7.gate_proj.weight") == "model.layers.3.mlp"  # outermost index
    assert unit_of("model.layers.3.input_layernorm.weight") == "model.layers.3.input_layernorm"
    assert unit_of("model.layers.3.scale") == "model.layers.3"
    assert unit_of("model.embed_tokens.weight") == "model.embed_tokens"
    assert unit_of("lm_head.weight") == "lm_head"
    units = group_units(["b.0.x.w", "a.w", "b.0.x.v", "b.1.x.w"])
    assert units == {"b.0.x": ["b.0.x.w", "b.0.x.v"], "a": ["a.w"], "b.1.x": ["b.1.x.w"]}


def test_digest_sees_any_change_of_bytes_dtype_or_shape() -> None:
    t = torch.randn(64, 33)
    assert tensor_digest(t) == tensor_digest(t.clone())
    flipped = t.clone()
    flipped.view(torch.int32)[17, 5] ^= 1  # one bit
    assert tensor_digest(flipped) != tensor_digest(t)
    assert tensor_digest(t.view(torch.int32)) != tensor_digest(t)
    assert tensor_digest(t.reshape(33, 64)) != tensor_digest(t)
    assert tensor_digest(t[:, ::2]) == tensor_digest(t[:, ::2].contiguous())  # layout does not matter
    assert tensor_digest(torch.empty(0, 3)) != tensor_digest(torch.empty(3, 0))
    half = t.to(torch.bfloat16)
    assert tensor_digest(half) == tensor_digest(half.clone()) != tensor_digest(half * 2)


def test_device_digest_sees_single_changes_and_swaps() -> None:
    t = torch.randn(1000, dtype=torch.float64)
    base = _device_digest(t)
    changed = t.clone()
    changed[999] += 1e-12
    swapped = t.clone()
    swapped[[3, 700]] = t[[700, 3]]
    assert _device_digest(t.clone()) == base
    assert _device_digest(changed) != base and _device_digest(swapped) != base
    odd = torch.arange(7, dtype=torch.uint8)  # not a whole number of 32-bit words
    assert _device_digest(odd) != _device_digest(odd + 1)
    assert _device_digest(t, chunk=100) != _device_digest(changed, chunk=100)


def test_buckets_pack_whole_units_in_order_within_the_limit() -> None:
    def unit(prefix: str, *sizes: int) -> list[TensorMeta]:
        return [TensorMeta(f"{prefix}.{i}", "float32", (n,)) for i, n in enumerate(sizes)]

    # bytes: 800, 200, 4000, 80
    units = [unit("a", 100, 100), unit("b", 50), unit("c", 1000), unit("d", 10, 10)]
    buckets = plan_buckets(units, bucket_bytes=1000)
    assert [b.names for b in buckets] == [["a.0", "a.1", "b.0"], ["c.0"], ["d.0", "d.1"]]
    assert [b.nbytes for b in buckets] == [1000, 4000, 80]  # the oversized unit travels alone
    aligned = plan_buckets(units, bucket_bytes=1000, align=True)
    for bucket in aligned:
        ends = [t.offset + t.nbytes for t in bucket.tensors]
        assert all(t.offset % 64 == 0 for t in bucket.tensors)
        assert all(end <= nxt.offset for end, nxt in zip(ends, bucket.tensors[1:], strict=False))
        assert bucket.packed_nbytes == ends[-1]
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(units, 0)


def test_changed_only_plans(state: dict[str, torch.Tensor]) -> None:
    total = sum(t.numel() * t.element_size() for t in state.values())
    tracker = ChangeTracker()
    first = tracker.plan(state, bucket_bytes=1 << 20)
    assert first.bytes_sent == total and first.units_skipped == 0 and len(first.buckets) > 1
    for bucket in first.buckets:  # within the limit, or one oversized unit (a MoE layer) alone
        assert bucket.nbytes <= 1 << 20 or len({unit_of(n) for n in bucket.names}) == 1
    assert any(b.nbytes > 1 << 20 for b in first.buckets)
    sent = [n for b in first.buckets for n in b.names]
    assert sorted(sent) == sorted(state)
    tracker.commit(first)

    same = tracker.plan({k: v.clone() for k, v in state.items()}, 1 << 20)
    assert same.buckets == [] and same.bytes_sent == 0 and same.bytes_skipped == total

    changed = dict(state)
    name = "model.layers.2.self_attn.q_proj.weight"
    changed[name] = state[name].clone()
    changed[name][0, 0] += 1.0
    plan = tracker.plan(changed, 1 << 20)
    unit = [n for n in state if n.startswith("model.layers.2.self_attn.")]
    assert [n for b in plan.buckets for n in b.names] == unit
    assert plan.bytes_sent + plan.bytes_skipped == total and plan.units_sent == 1

    with pytest.raises(ValueError, match=r"part of unit 'model.layers.2.self_attn'.*k_proj"):
        tracker.plan({name: changed[name]}, 1 << 20)
    assert tracker.plan({"lm_head.weight": state["lm_head.weight"]}, 1 << 20).buckets == []  # a whole unit

    tracker.reset()
    assert tracker.plan(state, 1 << 20).bytes_sent == total
    everything = ChangeTracker(changed_only=False)
    everything.commit(everything.plan(state, 1 << 20))
    assert everything.plan(state, 1 << 20).bytes_sent == total
    with pytest.raises(ValueError, match="empty"):
        tracker.plan({}, 1 << 20)


def _mixed() -> dict[str, torch.Tensor]:
    return {
        "a.w": torch.randn(5, 3),
        "a.h": torch.randn(7, dtype=torch.float64).to(torch.bfloat16),
        "b.i": torch.arange(9, dtype=torch.int64).reshape(3, 3)[:, 1],  # not contiguous
        "b.s": torch.tensor(2.5),
        "c.e": torch.empty(0, 4),
        "c.m": torch.tensor([True, False, True]),
    }


def test_packed_buffers_round_trip_bit_exactly() -> None:
    tensors = _mixed()
    units = [[TensorMeta(n, str(t.dtype)[6:], tuple(t.shape)) for n, t in tensors.items()]]
    (bucket,) = plan_buckets(units, 1 << 20, align=True)
    wire = pickle.loads(pickle.dumps(bucket_to_wire(bucket)))
    assert bucket_from_wire(wire) == bucket
    out = dict(unpack(pack(tensors, bucket, torch.device("cpu")), bucket_from_wire(wire)))
    assert out.keys() == tensors.keys()
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name
    bad = dict(tensors, **{"a.w": tensors["a.w"].double()})
    with pytest.raises(ValueError, match=r"'a\.w' is torch\.float64"):
        pack(bad, bucket, torch.device("cpu"))


def test_gloo_group_broadcasts_a_packed_bucket_between_two_ranks() -> None:
    tensors = _mixed()
    units = [[TensorMeta(n, str(t.dtype)[6:], tuple(t.shape)) for n, t in tensors.items()]]
    (bucket,) = plan_buckets(units, 1 << 20, align=True)
    store = create_store("127.0.0.1", 2, timeout_s=30)
    received: dict[str, torch.Tensor] = {}

    def rank1() -> None:
        group = join_group("127.0.0.1", store.port, 1, 2, "gloo", timeout_s=30)
        buffer = torch.empty(bucket.packed_nbytes, dtype=torch.uint8)
        broadcast(group, buffer)
        received.update(unpack(buffer, bucket))

    thread = threading.Thread(target=rank1)
    thread.start()
    group = join_group(store, store.port, 0, 2, "gloo", timeout_s=30)
    broadcast(group, pack(tensors, bucket, torch.device("cpu")))
    thread.join(timeout=30)
    assert all(torch.equal(received[n], t) for n, t in tensors.items())
    with pytest.raises(ValueError, match="rank 2 is outside"):
        join_group("127.0.0.1", store.port, 2, 2, "gloo", timeout_s=1)


def test_nccl_refuses_cpu_with_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"weight_sync='nccl' needs CUDA.*object_store"):
        check_transport("nccl")
    with pytest.raises(ValueError, match="unknown broadcast transport 'mpi'"):
        check_transport("mpi")
    backend = BroadcastBackend([], bucket_mb=1)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        backend.connect()
    clone = pickle.loads(pickle.dumps(backend))  # shipped to the learner without a process group
    assert clone.transport == "nccl" and clone._group is None and clone.bucket_bytes == 1 << 20
    with pytest.raises(ValueError, match=r"unknown rollout\.weight_sync 'tcp'"):
        make_backend("tcp", [], 64)


def test_config_rejects_bad_sync_settings() -> None:
    assert RolloutConfig().bucket_mb == 64 and RolloutConfig().weight_sync == "object_store"
    with pytest.raises(ValueError, match="bucket_mb"):
        RolloutConfig(bucket_mb=0)
    with pytest.raises(ValueError, match="weight_sync"):
        RolloutConfig(weight_sync="tcp")
    with pytest.raises(ValueError, match="engine"):
        RolloutConfig(engine="threaded")
