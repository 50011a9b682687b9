"""Tiny configs of every supported family, built and saved by transformers itself, for the model tests."""

from __future__ import annotations

import torch

VOCAB = 101

# Each tiny config exercises what makes its family different; all are deliberately awkward (head_dim not
# hidden/heads, GQA, odd vocab) and short windows so that sequences of ~30 tokens cross them.
FAMILY_CONFIGS = {
    "llama3": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
        max_position_embeddings=256,
    ),
    "smollm2_tied": dict(
        model_type="llama",
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        model_type="qwen3",
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    ),
    "mistral_nemo": dict(
        model_type="mistral",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # 4 · 24 ≠ 64, as NeMo's 32 · 128 ≠ 5120
        rope_theta=1_000_000.0,
        sliding_window=None,
    ),
    "mistral_window": dict(
        model_type="mistral",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        sliding_window=7,
    ),
    "phi4": dict(
        model_type="phi3",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=250000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "phi4_mini": dict(
        model_type="phi3",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        partial_rotary_factor=0.75,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_scaling=dict(
            type="longrope",
            short_factor=[1.0 + 0.1 * i for i in range(6)],
            long_factor=[1.5 + 0.5 * i for i in range(6)],
        ),
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=20,
        sliding_window=6,
        sliding_window_pattern=2,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10000.0,
        rope_scaling=dict(rope_type="linear", factor=8.0),
        final_logit_softcapping=5.0,
        max_position_embeddings=512,
    ),
}


# The mixtures of experts and Qwen3.5 (their own tests: test_models_moe.py, test_models_gpt_oss.py,
# test_models_qwen3_5.py). Awkward on purpose:
# head_dim ≠ hidden / heads, GQA, odd expert counts, Qwen3 MoE's dense layer between sparse ones
# (mlp_only_layers), gpt-oss' window of 6 and a SwiGLU limit the random activations reach.
MOE_CONFIGS = {
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        num_experts=7,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        mlp_only_layers=[1],
        rope_theta=1_000_000.0,
    ),
    "gpt_oss": dict(
        model_type="gpt_oss",
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=5,
        num_experts_per_tok=2,
        sliding_window=6,
        swiglu_limit=0.3,
    ),
    # Qwen3.5: three gated-DeltaNet layers and one gated full-attention layer; more value than key heads
    "qwen3_5": dict(
        model_type="qwen3_5_text",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=12,
        linear_conv_kernel_dim=4,
    ),
}


def hf_model(name: str, seed: int = 0, **overrides):
    """transformers' own model of a tiny config, with every parameter (norms included) randomized."""
    import transformers

    family = FAMILY_CONFIGS.get(name) or MOE_CONFIGS[name]
    cfg = transformers.AutoConfig.for_model(**{"vocab_size": VOCAB, **family, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, dtype=torch.float32, attn_implementation="eager"
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def saved_hf_model(name: str, path, seed: int = 0, **overrides):
    model = hf_model(name, seed, **overrides)
    model.save_pretrained(path)
    return model


def random_ids(shape, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def router_aux_loss_pair(hf, model, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(kindred's, transformers') router load-balancing loss on the same random ids, kindred in train mode
    for the one forward (the loss is recorded while training)."""
    ids = random_ids((2, 17), seed=seed)
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True).aux_loss
    model.train()
    try:
        model(ids)
        loss = model.router_aux_loss()
    finally:
        model.eval()
    return loss, ref
