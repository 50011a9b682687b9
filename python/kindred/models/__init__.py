"""kindred.models: one compact decoder for the catalogue's families (dense and Qwen3 MoE), built from a HF
config.json.

``from_pretrained(path, quant=None | "nf4" | "int4g")`` loads a safetensors model directory (streamed,
quantized on load; bitsandbytes 4-bit checkpoints as stored), ``from_config(config)`` builds seeded random
weights, ``from_gguf(path)`` imports a llama.cpp GGUF file. Each returns a :class:`DecoderLM`.
"""

from ..lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
