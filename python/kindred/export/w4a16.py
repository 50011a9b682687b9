"""Writing an INT4g model (AWQ or round-to-nearest) as a W4A16 checkpoint: compressed-tensors
``pack-quantized`` (default; vLLM's preferred format) or AutoAWQ GEMM; ``lm_head``, embeddings and norms
stay 16-bit. Tensor names follow the base checkpoint's layout when its folder is given (Gemma 3's vision
tower and projector are carried through from it unchanged); Phi's parts are fused back."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import KindredValueError
from ..formats.checkpoint import FUSED_LINEARS, canonical_name, shard_files
from ..formats.w4a16 import awq_gemm_config, compressed_tensors_config, int4g_to_compressed_tensors
from ..models import DecoderLM
from ..nn import Linear4bit
from ..ops.quant import int4g_to_awq
from ..weights import Int4gWeight
from .files import DEFAULT_SHARD_BYTES, ShardWriter, atomic_folder
from .merged import write_side_files

FORMATS = ("compressed-tensors", "awq-gemm")
_MULTIMODAL_IGNORE = ["re:.*vision_tower.*", "re:.*multi_modal_projector.*"]


def _cat_rows(qs: list[Int4gWeight]) -> Int4gWeight:
    """Row-stacked INT4g weights (rows are independent: exact)."""
    first = qs[0]
    cat = {k: torch.cat([q.tensors()[k] for q in qs]) for k in ("packed", "scales", "zeros")}
    return Int4gWeight(cat["packed"], cat["scales"], cat["zeros"], first.group_size, first.dtype)


def _quantized_linears(model: DecoderLM) -> dict[str, Int4gWeight]:
    """{module name: weight} of the INT4g projections, Phi's parts fused back into qkv_proj / gate_up_proj."""
    out = {n: m.quantized for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if any(not isinstance(q, Int4gWeight) for q in out.values()):
        raise KindredValueError("a W4A16 export needs INT4g linears (AWQ or round-to-nearest), not NF4")
    if model.config.fused_checkpoint:
        for layer in range(model.config.num_layers):
            p = f"model.layers.{layer}."
            for fused, parts in FUSED_LINEARS.items():
                out[p + fused] = _cat_rows([out.pop(p + part).to("cpu") for part in parts])
    return out


def _namer(base: Path | None):
    """kindred name -> the base checkpoint's name (its language-model prefix), from the base's keys."""
    if base is None:
        return lambda n: n
    keys = []
    for f in shard_files(base):
        with safe_open(str(f), framework="pt", device="cpu") as h:
            keys += list(h.keys())
    embed = next((k for k in keys if canonical_name(k) == "model.embed_tokens.weight"), None)
    prefix = embed[: -len("embed_tokens.weight")] if embed else "model."
    return lambda n: prefix + n[len("model.") :] if n.startswith("model.") else n


def save_w4a16(
    model: DecoderLM,
    hf_config: dict,
    path: str | Path,
    tokenizer=None,
    *,
    fmt: str = "compressed-tensors",
    base: str | Path | None = None,
    dtype: torch.dtype | None = None,
    chat_template: str | None = None,
    template: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (INT4g projections) to the folder ``path`` as ``fmt`` (see FORMATS); the 16-bit
    tensors in ``dtype`` (default bfloat16; float16 for AutoAWQ GEMM, whose kernels take fp16 only). ``base``:
    the model folder it came from (layout, tokenizer, vision tower)."""
    if fmt not in FORMATS:
        raise KindredValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    dtype = dtype or (torch.float16 if fmt == "awq-gemm" else torch.bfloat16)
    base = Path(base) if base is not None and Path(base).is_dir() else None
    if model.config.multimodal and base is None:
        raise KindredValueError(
            "a Gemma 3 multimodal export carries its vision tower from the base folder: pass base="
        )
    quantized = _quantized_linears(model)
    if not quantized:
        raise KindredValueError("the model has no INT4g linear: quantize it first (AWQ or round-to-nearest)")
    group = next(iter(quantized.values())).group_size
    name = _namer(base)
    with atomic_folder(path, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for module, q in quantized.items():
            if fmt == "compressed-tensors":  # float32 scales in a float32 export: readers dequantize exactly
                parts = int4g_to_compressed_tensors(
                    q, torch.float32 if dtype == torch.float32 else torch.float16
                )
            else:
                parts = int4g_to_awq(q)
            for suffix, t in parts.items():
                writer.add(f"{name(module)}.{suffix}", t)
        skip = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, Linear4bit))
        for key, t in model.state_dict().items():
            if key.startswith(skip) or key.endswith("inv_freq"):
                continue
            if key == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            writer.add(name(key), t.to(dtype) if t.is_floating_point() else t)
        if base is not None:  # what is not the decoder's (a vision tower), as the base stores it
            with contextlib.ExitStack() as stack:
                for f in shard_files(base):
                    h = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                    for key in h.keys():  # noqa: SIM118
                        if canonical_name(key) is None and not key.endswith("inv_freq"):
                            writer.add(key, h.get_tensor(key))
        writer.finish()
        not_converted = ["lm_head", *(_MULTIMODAL_IGNORE if model.config.multimodal else [])]
        qconfig = (
            compressed_tensors_config(group, not_converted)
            if fmt == "compressed-tensors"
            else awq_gemm_config(group, [n.removeprefix("re:.*").removesuffix(".*") for n in not_converted])
        )
        write_side_files(
            tmp,
            hf_config,
            tokenizer,
            source=base,
            chat_template=chat_template,
            template=template,
            dtype=dtype,
            quantization_config=qconfig,
        )
    return Path(path)
