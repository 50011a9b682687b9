"""Merged weights: every LoRA adapter folded into its (dequantized) base, saved as a Hugging Face folder
(config.json + model.safetensors + tokenizer) that transformers or kindred.models.from_pretrained load."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..nn import Linear4bit, LoraLinear


def _dense(module: nn.Module) -> torch.Tensor:
    if isinstance(module, LoraLinear):
        return module.merged_weight()
    if isinstance(module, Linear4bit):
        return module.dequantize()
    return module.weight.detach()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors in transformers' names, adapters merged, 4-bit weights dequantized (the model
    itself is not changed). Phi-3/4 get their fused ``qkv_proj`` / ``gate_up_proj`` back."""
    out: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (LoraLinear, Linear4bit))}
    linears = {n: m for n, m in linears.items() if not n.endswith(".base_layer")}  # inside a LoraLinear
    for name, module in linears.items():
        out[f"{name}.weight"] = _dense(module)
        base = module.base_layer if isinstance(module, LoraLinear) else module
        if getattr(base, "bias", None) is not None:
            out[f"{name}.bias"] = base.bias.detach()
    skip = tuple(f"{n}." for n in linears)
    for name, t in model.state_dict(keep_vars=False).items():
        if not name.startswith(skip) and name not in out:
            out[name] = t.detach()
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    if model.config.fused_checkpoint:
        for layer in range(model.config.num_layers):
            p = f"model.layers.{layer}"
            qkv = [out.pop(f"{p}.self_attn.{x}_proj.weight") for x in "qkv"]
            out[f"{p}.self_attn.qkv_proj.weight"] = torch.cat(qkv)
            gu = [out.pop(f"{p}.mlp.{x}_proj.weight") for x in ("gate", "up")]
            out[f"{p}.mlp.gate_up_proj.weight"] = torch.cat(gu)
    return {k: v.contiguous().cpu() for k, v in out.items() if not k.endswith("inv_freq")}


def save_merged(model: nn.Module, hf_config: dict, path: str | Path, tokenizer=None) -> Path:
    """Write the merged model to ``path`` (config.json, model.safetensors and, if given, the tokenizer)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = merged_state_dict(model)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = dict(hf_config)
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    library = getattr(tokenizer, "library", None)
    if library is not None:
        library.save(str(path / "tokenizer.json"))
    elif getattr(tokenizer, "path", None):
        src = Path(tokenizer.path)
        (path / src.name).write_bytes(src.read_bytes())
    return path
