"""Models for the export tests: transformers' own tiny checkpoints (Gemma 3 multimodal included) and kindred
models of them with random non-zero LoRA adapters."""

from __future__ import annotations

import torch

from kindred import models
from kindred.nn import apply_lora, lora_modules

from .model_helpers import FAMILY_CONFIGS, VOCAB, saved_hf_model

# Every family kindred exports, by tiny config name ("gemma3_mm": Gemma 3 with a vision tower).
EXPORT_FAMILIES = ["llama3", "qwen3", "gemma3", "gemma3_mm", "mistral_nemo", "phi4"]


def _randomize(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def saved_gemma3_multimodal(path, seed: int = 0):
    """transformers' Gemma3ForConditionalGeneration of the tiny gemma3 text config and a one-layer SigLIP
    tower, every parameter randomized, saved to ``path`` (its own layout: language_model.model.*)."""
    import transformers

    # No final softcap: Gemma3ForConditionalGeneration never applies one (the released models have none).
    text = {**FAMILY_CONFIGS["gemma3"], "vocab_size": VOCAB, "final_logit_softcapping": None}
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = _randomize(transformers.Gemma3ForConditionalGeneration(cfg), seed + 1)
    model.save_pretrained(path)
    return model


def saved_base(name: str, path, seed: int = 0):
    """transformers' model of family ``name`` saved to ``path`` (float32)."""
    if name == "gemma3_mm":
        return saved_gemma3_multimodal(path, seed)
    return saved_hf_model(name, path, seed)


def load_hf(path, name: str):
    import transformers

    cls = (
        transformers.Gemma3ForConditionalGeneration
        if name == "gemma3_mm"
        else transformers.AutoModelForCausalLM
    )
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def with_lora(path, quant=None, seed: int = 3):
    """kindred's model of ``path`` with LoRA on all seven projections (r 4, alpha 8; down_proj r 2, alpha 3)
    and random non-zero B."""
    model = models.from_pretrained(path, quant=quant, dtype=torch.float32, group_size=32)
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"], r=4, alpha=8)
    apply_lora(model, ["down_proj"], r=2, alpha=3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            b = m.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.2)
    return model.eval()
