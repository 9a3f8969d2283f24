"""Planning a weight push: which tensors changed since the last push, and how they pack into buckets.

Pure (torch + xxhash, no Ray, no vLLM), shared by every backend.

Units. vLLM fuses several checkpoint tensors into one of its modules (q/k/v into `qkv_proj`, gate/up into
`gate_up_proj`, all of a MoE layer's experts into one fused-experts module), and its layerwise reload
rebuilds a module only once *all* of its tensors have arrived: a module that gets only some of them is
rebuilt from uninitialised memory (vllm/model_executor/model_loader/reload/layerwise.py, "Delayed
processing"). So tensors travel in units that always hold whole vLLM modules: one child of a decoder
layer (`model.layers.3.self_attn`, `model.layers.3.moe`, keyed on the outermost layer index so that
`...layers.3.mlp.experts.7.w1` stays with its layer's MLP), or one module outside the layer stacks
(`model.embed_tokens`, `lm_head`). A unit is sent whole when any of its tensors changed, and never split
across buckets; a unit larger than the bucket limit travels alone in a bucket of its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash  # a dependency of `datasets`; ~30 GB/s, memory-bound

_ALIGN = 64
"""Byte alignment of each tensor inside a packed broadcast buffer (any dtype's `view` stays legal)."""


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs to rebuild one tensor from a packed bucket buffer."""

    name: str
    dtype: str
    """torch dtype name without the `torch.` prefix, e.g. `float32`."""
    shape: tuple[int, ...]
    offset: int = 0
    """Byte offset inside the bucket's packed buffer (broadcast backends only)."""

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * dtype_of(self.dtype).itemsize


@dataclass(frozen=True)
class Bucket:
    """Tensors sent (serialised, or packed and broadcast) and loaded in one step."""

    tensors: tuple[TensorMeta, ...]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def nbytes(self) -> int:
        """Payload bytes: the tensors' own bytes (no headers, no alignment padding)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def packed_nbytes(self) -> int:
        """Size of the packed broadcast buffer, alignment padding included."""
        last = self.tensors[-1]
        return last.offset + last.nbytes if self.tensors else 0


@dataclass(frozen=True)
class PushPlan:
    """The buckets of one push and what it skipped."""

    buckets: list[Bucket]
    digests: dict[str, bytes]
    """Digests of every tensor in the state dict: the tracker's new baseline once the push succeeds."""
    units_sent: int
    units_skipped: int
    bytes_skipped: int

    @property
    def bytes_sent(self) -> int:
        return sum(b.nbytes for b in self.buckets)


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r}")
    return dtype


def describe(name: str, tensor: torch.Tensor) -> TensorMeta:
    return TensorMeta(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))


def unit_of(name: str) -> str:
    """The unit a checkpoint tensor travels in (see the module docstring)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: min(i + 2, len(parts) - 1)])
    return ".".join(parts[:-1]) or name


def group_units(names: list[str]) -> dict[str, list[str]]:
    """Tensor names by unit, units in order of first appearance, names in input order within a unit."""
    units: dict[str, list[str]] = {}
    for name in names:
        units.setdefault(unit_of(name), []).append(name)
    return units


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """A 128-bit fingerprint of a tensor's dtype, shape and bytes (xxh3 on CPU, a torch sum on devices)."""
    header = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    t = tensor.detach()
    if t.device.type != "cpu":
        return header + _device_digest(t)
    # ndarray.data: the array's buffer as a memoryview (numpy's stubs declare ndarray a Buffer only on 3.12+)
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
    return header + xxhash.xxh3_128_digest(memoryview(data))


def _device_digest(t: torch.Tensor, chunk: int = 1 << 24) -> bytes:
    """Digest computed where the tensor lives (no host copy of a GPU tensor): two 64-bit sums of its
    32-bit words, one plain and one weighted by odd position-dependent factors, so that any change of a
    single word always shows and a change of several shows unless the weighted sums cancel mod 2**64."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.int32)
    plain = weighted = 0
    for start in range(0, words.numel(), chunk):
        part = words[start : start + chunk].to(torch.int64)
        factors = torch.arange(start, start + part.numel(), device=t.device, dtype=torch.int64)
        factors = (factors * 0x5851F42D4C957F2D + 0x14057B7EF767814F) | 1  # int64 wraps; always odd
        plain += int(part.sum())
        weighted += int((part * factors).sum())
    return (plain % (1 << 64)).to_bytes(8, "little") + (weighted % (1 << 64)).to_bytes(8, "little")


def plan_buckets(units: list[list[TensorMeta]], bucket_bytes: int, align: bool = False) -> list[Bucket]:
    """Pack whole units, in order, into buckets of at most `bucket_bytes` (a bigger unit goes alone).

    With `align`, each tensor gets a byte offset (aligned to 64) inside its bucket's packed buffer.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: list[list[TensorMeta]] = []
    size = 0
    for unit in units:
        unit_bytes = sum(t.nbytes for t in unit)
        if not buckets or size + unit_bytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].extend(unit)
        size += unit_bytes
    return [Bucket(tuple(_with_offsets(b) if align else b)) for b in buckets if b]


def _with_offsets(tensors: list[TensorMeta]) -> list[TensorMeta]:
    out, offset = [], 0
    for t in tensors:
        out.append(TensorMeta(t.name, t.dtype, t.shape, offset))
        offset += -(-t.nbytes // _ALIGN) * _ALIGN
    return out


def checkpoint_tensors(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors of an HF checkpoint directory (safetensors headers only).

    With tied embeddings the checkpoint has no `lm_head.weight`, but a learner's state dict may: it is
    accepted too (with the embedding's shape).
    """
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in checkpoint {path}")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                shapes[name] = tuple(f.get_slice(name).get_shape())
    config = Path(path) / "config.json"
    tied = config.is_file() and json.loads(config.read_text()).get("tie_word_embeddings", False)
    if tied and "model.embed_tokens.weight" in shapes:
        shapes.setdefault("lm_head.weight", shapes["model.embed_tokens.weight"])
    return shapes


class ChangeTracker:
    """What the engines hold (a digest per tensor), so that a push sends only the units that changed.

    The baseline is empty until the first push succeeds, so the first push sends everything; `reset()`
    (after a failed push, whose units may be half-applied) makes the next push send everything again.
    `known` (the engines' checkpoint tensors: name → shape) turns unknown names, wrong shapes and partial
    units into errors before anything is sent (vLLM would silently skip an unknown name).
    """

    def __init__(self, changed_only: bool = True, known: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self.changed_only = changed_only
        self.known = dict(known) if known is not None else None
        self._digests: dict[str, bytes] = {}
        self._units: dict[str, set[str]] = {u: set(n) for u, n in group_units(list(known or {})).items()}

    def plan(
        self, state_dict: Mapping[str, torch.Tensor], bucket_bytes: int, align: bool = False
    ) -> PushPlan:
        if not state_dict:
            raise ValueError("empty state dict: nothing to push")
        self._check_known(state_dict)
        digests = {name: tensor_digest(t) for name, t in state_dict.items()}
        units = group_units(list(state_dict))
        self._check_complete(units)
        send, skipped_units, skipped_bytes = [], 0, 0
        for names in units.values():
            metas = [describe(n, state_dict[n]) for n in names]
            if self.changed_only and all(self._digests.get(n) == digests[n] for n in names):
                skipped_units += 1
                skipped_bytes += sum(m.nbytes for m in metas)
            else:
                send.append(metas)
        buckets = plan_buckets(send, bucket_bytes, align)
        return PushPlan(buckets, digests, len(send), skipped_units, skipped_bytes)

    def commit(self, plan: PushPlan) -> None:
        self._digests.update(plan.digests)
        for unit, names in group_units(list(plan.digests)).items():
            self._units.setdefault(unit, set()).update(names)

    def reset(self) -> None:
        self._digests.clear()

    def _check_known(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        if self.known is None:
            return
        unknown = sorted(set(state_dict) - set(self.known))
        if unknown:
            shown = f"{unknown[:10]} ({len(unknown)} in all)"
            raise ValueError(f"tensors not in the engines' checkpoint: {shown}")
        for name, tensor in state_dict.items():
            if tuple(tensor.shape) != self.known[name]:
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}; the engines' checkpoint has "
                    f"{self.known[name]}"
                )

    def _check_complete(self, units: dict[str, list[str]]) -> None:
        """A push may leave whole units out, not part of one (vLLM would rebuild the rest from garbage)."""
        for unit, names in units.items():
            missing = sorted(self._units.get(unit, set()) - set(names))
            if missing:
                raise ValueError(
                    f"state dict holds only part of unit {unit!r}: missing {missing}; a unit's tensors load "
                    "into fused vLLM modules together, so push all of them or none"
                )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
