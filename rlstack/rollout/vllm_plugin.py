"""vLLM general plugin (entry point `vllm.general_plugins: rlstack`): CPU fixes for Step3p5.

vLLM imports this in every process it starts (the engine core and its workers are spawned, so a patch
made only in the parent would not reach them). On CPU it:

- maps vLLM's own Step3p5Config class to rlstack's PyTorch model in transformers' Auto classes, so
  `AutoModelForCausalLM.from_pretrained(dir)` works in a process that has imported vLLM;
- routes Step3p5's sigmoid router through vLLM's grouped top-k path with one group: the plain CPU
  router asserts `scoring_func == "softmax"` (vllm/.../router/cpu_router.py), while the grouped path
  implements sigmoid + selection bias, which with `num_expert_group = topk_group = 1` is exactly
  Step 3.5's routing;
- lets Step3p5 serve a dense model (no MoE layer, `moe_layers_enum: ""`, the `tiny_dense` builder): vLLM
  int()s every item of `moe_layers_enum` and `Step3p5ForCausalLM.__init__` asserts at least one MoE layer;
- keeps torch inductor's precompiled C++ headers (~150 MB each, built on an engine's first generate) in
  `TORCHINDUCTOR_CACHE_DIR` when that is set: torch puts them in the temp dir on purpose
  (torch/_inductor/codecache.py `_HEADER_DIR`), so in-process engines left them in /tmp and engines
  with a private temp dir (every spawned engine core) rebuilt them at each start.

The function must be idempotent: vLLM may call it more than once per process.
"""

from __future__ import annotations

import functools
import os
from typing import Any

_PATCHED_ATTR = "_rlstack_cpu_sigmoid_router"
_DENSE_ATTR = "_rlstack_dense"


def register() -> None:
    from vllm.platforms import current_platform
    from vllm.transformers_utils.configs.step3p5 import Step3p5Config as VllmStep3p5Config

    from rlstack.model import register_auto_classes

    register_auto_classes(VllmStep3p5Config)
    patch_step3p5_dense()
    if not current_platform.is_cpu():
        return
    patch_step3p5_cpu_router()
    keep_precompiled_headers_in_cache()


def keep_precompiled_headers_in_cache() -> None:
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not cache:
        return
    from torch._inductor import codecache

    if hasattr(codecache, "_HEADER_DIR") and hasattr(codecache, "_HEADER_LOCK_DIR"):
        codecache._HEADER_DIR = os.path.join(cache, "precompiled_headers")
        codecache._HEADER_LOCK_DIR = os.path.join(codecache._HEADER_DIR, "locks")


def _is_dense(config: Any) -> bool:
    enum = getattr(config, "moe_layers_enum", None)
    return enum is not None and not enum.strip()


def patch_step3p5_dense() -> None:
    """Build Step3p5 layers of a config without MoE layers as dense MLPs, and the model without vLLM's
    MoE bookkeeping (num_moe_layers 0: vLLM then treats it as a dense model). Configs with MoE layers take
    vLLM's own code unchanged."""
    from torch import nn
    from vllm.distributed import get_pp_group
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.model_executor.models import step3p5
    from vllm.model_executor.models.utils import PPMissingLayer, maybe_prefix

    layer_cls, model_cls = step3p5.Step3p5DecoderLayer, step3p5.Step3p5ForCausalLM
    if getattr(model_cls, _DENSE_ATTR, False):
        return
    layer_init, model_init = layer_cls.__init__, model_cls.__init__

    def init_layer(self: Any, vllm_config: Any, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        if not _is_dense(config):
            return layer_init(self, vllm_config, prefix=prefix)
        enum, config.moe_layers_enum = config.moe_layers_enum, "-1"  # parsed by int(): matches no layer
        try:
            layer_init(self, vllm_config, prefix=prefix)
        finally:
            config.moe_layers_enum = enum

    def init_model(self: Any, *, vllm_config: Any, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        if not _is_dense(config):
            return model_init(self, vllm_config=vllm_config, prefix=prefix)
        nn.Module.__init__(self)
        self.model = step3p5.Step3p5Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        self.moe_layers = []
        self.num_moe_layers = 0
        self.num_expert_groups = 1
        self.num_shared_experts = 0
        self.num_logical_experts = self.num_physical_experts = self.num_local_physical_experts = 0
        self.num_routed_experts = self.num_redundant_experts = 0

    layer_cls.__init__ = init_layer  # type: ignore[method-assign]
    model_cls.__init__ = init_model  # type: ignore[method-assign]
    setattr(model_cls, _DENSE_ATTR, True)


def patch_step3p5_cpu_router() -> None:
    from vllm.model_executor.models import step3p5

    factory = step3p5.FusedMoEFactory
    if getattr(factory, _PATCHED_ATTR, False):
        return

    @functools.wraps(factory)
    def factory_with_grouped_sigmoid(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("scoring_func") == "sigmoid" and not kwargs.get("use_grouped_topk"):
            kwargs.update(use_grouped_topk=True, num_expert_group=1, topk_group=1)
        return factory(*args, **kwargs)

    setattr(factory_with_grouped_sigmoid, _PATCHED_ATTR, True)
    step3p5.FusedMoEFactory = factory_with_grouped_sigmoid
