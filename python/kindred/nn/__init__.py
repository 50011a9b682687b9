"""kindred's modules: thin layers that validate and call kindred.ops."""

from .linear4bit import Linear4bit
from .lora import LoraLinear, apply_lora, lora_modules, merge_lora, set_adapter, target_names

__all__ = [
    "Linear4bit",
    "LoraLinear",
    "apply_lora",
    "lora_modules",
    "merge_lora",
    "set_adapter",
    "target_names",
]
