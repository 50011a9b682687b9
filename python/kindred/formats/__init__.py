"""File formats kindred reads and writes: bitsandbytes 4-bit checkpoints, PEFT adapters, GGUF."""

from .bnb import has_bnb_state, nf4_from_bnb, nf4_to_bnb
from .checkpoint import load_linear4bit
from .gguf import gguf_metadata, gguf_tensor, gguf_to_hf_config, read_gguf, tokenizer_from_gguf
from .peft import load_adapter, read_adapter, save_adapter

__all__ = [
    "gguf_metadata",
    "gguf_tensor",
    "gguf_to_hf_config",
    "has_bnb_state",
    "load_adapter",
    "load_linear4bit",
    "nf4_from_bnb",
    "nf4_to_bnb",
    "read_adapter",
    "read_gguf",
    "save_adapter",
    "tokenizer_from_gguf",
]
