"""A vLLM V1 logits processor for tests (`rollout.logits_processors: ["logits_procs:OnlyEos"]`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

EOS = 2  # rlstack.model.builders: the char tokenizer's EOS id


class OnlyEos(LogitsProcessor):
    """Every token but EOS masked: each response is exactly [EOS]."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: Any) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # logits: [batch rows, vocab]
        eos = logits[:, EOS].clone()
        logits[:] = -math.inf
        logits[:, EOS] = eos
        return logits
