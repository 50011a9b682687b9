"""Reading tensors out of safetensors checkpoints (single file or a sharded folder) by name prefix, and the
names checkpoints give the decoder's tensors: Gemma 3's multimodal prefixes, Phi-3/4's fused linears."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..bounded import confined, json_object
from ..errors import KindredFormatError

INDEX_NAME = "model.safetensors.index.json"
# Where Gemma 3's multimodal checkpoints keep the language model (transformers v4 and v5 layouts) -> the
# text decoder's own names; the vision towers and projectors (Gemma 3, Qwen3-VL) are not the decoder's:
# loading keeps them aside by name, export writes them back.
TEXT_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.", ""),
)
ASIDE = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector|visual)\.")
_NOT_DECODER = re.compile(rf"{ASIDE.pattern}|\.rotary_emb\.inv_freq$")
# The module path transformers' Gemma3ForConditionalGeneration gives its language model (PEFT names adapters
# by module path, whatever the file layout).
MULTIMODAL_TEXT_MODULE = "model.language_model."
# Phi-3/4 store these linears fused, rows stacked in this order; kindred's decoder has the parts.
FUSED_LINEARS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def canonical_name(key: str) -> str | None:
    """The text decoder's name of a checkpoint tensor or module path (a multimodal prefix removed), or None
    for what is not the decoder's (vision tower, projector, rotary tables)."""
    if _NOT_DECODER.search(key):
        return None
    for old, new in TEXT_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def fused_parts(name: str) -> tuple[str, ...] | None:
    """The part names, in row order, when ``name`` (a module path) is a fused linear (e.g.
    ``model.layers.0.self_attn.qkv_proj`` -> ``...q_proj``, ``...k_proj``, ``...v_proj``); else None."""
    for fused, parts in FUSED_LINEARS.items():
        if name.endswith("." + fused):
            prefix = name[: -len(fused)]
            return tuple(prefix + p for p in parts)
    return None


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: ``path`` itself, the shards its index json names (each
    confined to the folder: no absolute path, ``..`` or symlink out; all present), or its *.safetensors."""
    if path.is_file():
        return [path]
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json_object(index, limit=64 << 20).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise KindredFormatError(f"{index}: not a safetensors index (needs a 'weight_map' object)")
        names = set(weight_map.values())
        files = sorted(confined(path, name, f"{INDEX_NAME}: shard") for name in names)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise KindredFormatError(f"{index}: lists shard(s) that are not in the directory: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise KindredFormatError(f"{path}: no model.safetensors (or sharded index) here")
    return files


def read_prefix(path: str | Path, prefix: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor named ``prefix + '.' + rest``, read lazily through safetensors, keyed by ``rest``."""
    out: dict[str, torch.Tensor] = {}
    for shard in shard_files(Path(path)):
        try:
            with safe_open(str(shard), framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key.startswith(prefix + "."):
                        out[key[len(prefix) + 1 :]] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise KindredFormatError(f"{shard}: not a readable safetensors file ({e})") from None
    return out
