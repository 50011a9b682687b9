"""The one registry of benchmark shapes: real model dimensions (design.md §6)."""

# name -> (hidden, intermediate, vocab)
MODELS = {
    "qwen3-8b": (4096, 12288, 151936),
    "gemma3-12b": (3840, 15360, 262208),
    "phi-4": (5120, 17920, 100352),
}
# Linear layers as (K in_features, N out_features): attention square, Llama-3-8B-style MLP up and down,
# Phi-4 MLP.
LINEARS = [(4096, 4096), (4096, 14336), (14336, 4096), (5120, 17920)]
DECODE_BATCHES = [1, 4, 16]
TRAIN_TOKENS = 8192


def shape_id(k: int, n: int, **extra) -> str:
    parts = [f"K={k}", f"N={n}", *(f"{key}={v}" for key, v in extra.items())]
    return ",".join(parts)
