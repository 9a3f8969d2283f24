"""vLLM general plugin (entry point `vllm.general_plugins: rlstack`): CPU fixes for Step3p5.

vLLM imports this in every process it starts (the engine core and its workers are spawned, so a patch
made only in the parent would not reach them). On CPU it:

- maps vLLM's own Step3p5Config class to rlstack's PyTorch model in transformers' Auto classes, so
  `AutoModelForCausalLM.from_pretrained(dir)` works in a process that has imported vLLM;
- routes Step3p5's sigmoid router through vLLM's grouped top-k path with one group: the plain CPU
  router asserts `scoring_func == "softmax"` (vllm/.../router/cpu_router.py), while the grouped path
  implements sigmoid + selection bias, which with `num_expert_group = topk_group = 1` is exactly
  Step 3.5's routing;
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


def register() -> None:
    from vllm.platforms import current_platform
    from vllm.transformers_utils.configs.step3p5 import Step3p5Config as VllmStep3p5Config

    from rlstack.model import register_auto_classes

    register_auto_classes(VllmStep3p5Config)
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
