"""The policy model: Step 3.5 Flash architecture in PyTorch, checkpoints that vLLM serves unchanged.

Importing this package registers `Step3p5Config` / `Step3p5ForCausalLM` with transformers' Auto classes,
so `AutoModelForCausalLM.from_pretrained(dir)` (and TRL, PEFT, `generate`) work on our checkpoints.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from rlstack.model.builders import BUILDERS, init_checkpoint, small, step3p5_config, tiny
from rlstack.model.configuration import Step3p5Config
from rlstack.model.modeling import Step3p5ForCausalLM, Step3p5Output
from rlstack.model.tokenizer import build_tokenizer


def register_auto_classes(*config_aliases: type) -> None:
    """Map model_type "step3p5" to our classes. vLLM registers its own config class under the same
    model_type; its plugin (rlstack.rollout.vllm_plugin) passes that class here as an alias, and our
    model converts such a config on construction."""
    AutoConfig.register(Step3p5Config.model_type, Step3p5Config, exist_ok=True)
    for config_class in (Step3p5Config, *config_aliases):
        AutoModelForCausalLM.register(config_class, Step3p5ForCausalLM, exist_ok=True)


register_auto_classes()

__all__ = [
    "BUILDERS",
    "Step3p5Config",
    "Step3p5ForCausalLM",
    "Step3p5Output",
    "build_tokenizer",
    "init_checkpoint",
    "register_auto_classes",
    "small",
    "step3p5_config",
    "tiny",
]
