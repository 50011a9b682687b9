"""kindred's modules: thin layers that validate and call kindred.ops."""

from .linear4bit import Linear4bit, load_linear4bit
from .lora import LoraLinear, apply_lora, lora_modules, merge_lora, set_adapter, target_names
from .loss import LinearCrossEntropyLoss
from .peft import load_adapter, save_adapter

__all__ = [
    "Linear4bit",
    "LinearCrossEntropyLoss",
    "LoraLinear",
    "apply_lora",
    "load_adapter",
    "load_linear4bit",
    "lora_modules",
    "merge_lora",
    "save_adapter",
    "set_adapter",
    "target_names",
]
