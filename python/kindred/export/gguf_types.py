"""The GGUF file types kindred writes (torch-free, for the CLI's parser): llama.cpp's mixes (per-tensor rules
in plan/memory.py) and the unquantized types (every matrix in that type), and a GGUF LoRA's tensor types."""

GGUF_QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "BF16", "F16", "F32")
LORA_TYPES = ("F32", "F16", "BF16", "Q8_0")
