"""File formats kindred reads and writes, as tensors: bitsandbytes 4-bit checkpoints, PEFT adapters, GGUF.

Modules built from files (a Linear4bit of a checkpoint, adapters onto a model) are in ``kindred.nn``.
"""

from .bnb import has_bnb_state, nf4_from_bnb, nf4_to_bnb
from .checkpoint import read_prefix
from .gguf import gguf_metadata, gguf_tensor, gguf_to_hf_config, read_gguf, tokenizer_from_gguf
from .peft import read_adapter, write_adapter

__all__ = [
    "gguf_metadata",
    "gguf_tensor",
    "gguf_to_hf_config",
    "has_bnb_state",
    "nf4_from_bnb",
    "nf4_to_bnb",
    "read_adapter",
    "read_gguf",
    "read_prefix",
    "tokenizer_from_gguf",
    "write_adapter",
]
