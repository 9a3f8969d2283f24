"""Moving new policy weights from the learner into running vLLM engines, in place (no restart).

The sending side serialises a state dict (HF/vLLM checkpoint names) to safetensors bytes once; each
engine receives them through `collective_rpc` into `WorkerExtension.rlstack_update_weights`, which runs
inside vLLM's worker (in-process or spawned) and calls vLLM's own `reload_weights`.

vLLM-CPU blocker 2: after `reload_weights` the CPU MoE kernel's prepacked expert layout is *not* rebuilt
(`UnquantizedFusedMoEMethod._setup_kernel` only prepacks on the first call), so routed experts silently
compute garbage. `_reprepack_cpu_moe` re-runs the CPU experts' own `process_weights_after_loading`,
which makes every parameter bit-identical to a fresh load (tested).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors


@dataclass
class SyncStats:
    bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 2**20 / max(self.seconds, 1e-9)


def serialize_state_dict(state_dict: dict[str, torch.Tensor]) -> bytes:
    """Contiguous CPU copies → safetensors bytes (picklable, one Ray object shared by every engine)."""
    return save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()})


class WorkerExtension:
    """Mixed into vLLM's worker class via `LLM(worker_extension_cls=...)`; call through `collective_rpc`."""

    def rlstack_update_weights(self, payload: bytes) -> int:
        weights = load_safetensors(payload)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))  # type: ignore[attr-defined]
        _reprepack_cpu_moe(self.model_runner.get_model())  # type: ignore[attr-defined]
        return len(weights)

    def rlstack_parameters(self) -> bytes:
        """The live parameters in the engine's kernel layout (to check bit-identity with a fresh load)."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return save_safetensors({k: v.detach().contiguous().clone() for k, v in model.named_parameters()})


def _reprepack_cpu_moe(model: torch.nn.Module) -> None:
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(getattr(kernel, "impl", None), "fused_experts", None)
        if experts is not None and hasattr(experts, "isa") and hasattr(module, "w13_weight"):
            experts.process_weights_after_loading(module)


def push_weights(llm: object, payload: bytes) -> SyncStats:
    """Load serialised weights into a live `vllm.LLM` (all its workers) and time it."""
    start = time.perf_counter()
    llm.collective_rpc("rlstack_update_weights", args=(payload,))  # type: ignore[attr-defined]
    return SyncStats(bytes=len(payload), seconds=time.perf_counter() - start)
