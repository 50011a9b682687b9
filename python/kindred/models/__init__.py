"""kindred.models: one compact decoder for the catalogue's families (dense and Qwen3 MoE), built from a HF
config.json.

``from_pretrained(path, quant=None | "nf4" | "int4g")`` loads a safetensors model directory (streamed,
quantized on load; bitsandbytes 4-bit checkpoints as stored), ``from_config(config)`` builds seeded random
weights, ``from_gguf(path)`` imports a llama.cpp GGUF file. Each returns a :class:`DecoderLM`.
"""

import importlib

# Names load from their modules on first use (kindred.plan reads the config facts without torch).
_EXPORTS = {
    "DecoderConfig": "config",
    "DecoderLM": "decoder",
    "FAMILIES": "config",
    "KVCache": "decoder",
    "LINEAR_NAMES": "config",
    "RopeConfig": "config",
    "apply_expert_lora": "moe",
    "from_config": "loading",
    "from_gguf": "gguf",
    "from_pretrained": "loading",
    "gguf_chat_template": "gguf",
    "gguf_tokenizer": "gguf",
    "load_config": "config",
    "smollm2_gguf_path": "gguf",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kindred.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
