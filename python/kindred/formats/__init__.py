"""File formats kindred reads and writes: bitsandbytes 4-bit checkpoints (PEFT, AWQ, GGUF as they land)."""

from .bnb import has_bnb_state, nf4_from_bnb, nf4_to_bnb
from .checkpoint import load_linear4bit
from .peft import load_adapter, read_adapter, save_adapter

__all__ = [
    "has_bnb_state",
    "load_adapter",
    "load_linear4bit",
    "nf4_from_bnb",
    "nf4_to_bnb",
    "read_adapter",
    "save_adapter",
]
