"""kindred's modules: thin layers that validate and call kindred.ops."""

from .linear4bit import Linear4bit
from .lora import LoraLinear, apply_lora, lora_modules, merge_lora, set_adapter, target_names
from .loss import LinearCrossEntropyLoss

__all__ = [
    "Linear4bit",
    "LinearCrossEntropyLoss",
    "LoraLinear",
    "apply_lora",
    "lora_modules",
    "merge_lora",
    "set_adapter",
    "target_names",
]
