"""The one registry of benchmark shapes: real model dimensions."""

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

# Hugging Face config.json of the models the end-to-end benchmarks build with random weights (numbers as in
# python/kindred/plan/catalogue.json; bench_e2e.py's CPU test checks them).
HF_CONFIGS = {
    "qwen3-8b": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
    },
    "gemma3-12b": {
        "model_type": "gemma3_text",
        "vocab_size": 262208,
        "hidden_size": 3840,
        "intermediate_size": 15360,
        "num_hidden_layers": 48,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "query_pre_attn_scalar": 256,
        "sliding_window": 1024,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 8,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "tie_word_embeddings": True,
    },
    "gemma3-27b": {
        "model_type": "gemma3_text",
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "num_hidden_layers": 62,
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "head_dim": 128,
        "vocab_size": 262208,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "query_pre_attn_scalar": 168,
        "sliding_window": 1024,
        "sliding_window_pattern": 6,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None,
        "tie_word_embeddings": True,
    },
}


def shape_id(k: int, n: int, **extra) -> str:
    parts = [f"K={k}", f"N={n}", *(f"{key}={v}" for key, v in extra.items())]
    return ",".join(parts)
