"""File formats kindred reads and writes: bitsandbytes 4-bit checkpoints (PEFT, AWQ, GGUF as they land)."""

from .bnb import has_bnb_state, nf4_from_bnb, nf4_to_bnb
from .checkpoint import load_linear4bit

__all__ = ["has_bnb_state", "load_linear4bit", "nf4_from_bnb", "nf4_to_bnb"]
