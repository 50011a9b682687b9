"""kindred.models: one compact decoder for the catalogue's dense families, built from a HF config.json.

``from_pretrained(path, quant=None | "nf4" | "int4g")`` loads a safetensors model directory (streamed,
quantized on load; bitsandbytes 4-bit checkpoints as stored), ``from_config(config)`` builds seeded random
weights, ``from_gguf(path)`` imports a llama.cpp GGUF file. Each returns a :class:`DecoderLM`.
"""

from .config import FAMILIES, DecoderConfig, RopeConfig, load_config
from .decoder import LINEAR_NAMES, DecoderLM, KVCache
from .gguf import from_gguf, gguf_chat_template, gguf_tokenizer, smollm2_gguf_path
from .loading import from_config, from_pretrained

__all__ = [
    "FAMILIES",
    "LINEAR_NAMES",
    "DecoderConfig",
    "DecoderLM",
    "KVCache",
    "RopeConfig",
    "from_config",
    "from_gguf",
    "from_pretrained",
    "gguf_chat_template",
    "gguf_tokenizer",
    "load_config",
    "smollm2_gguf_path",
]
