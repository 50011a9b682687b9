"""A kindred LoRA adapter as a GGUF LoRA file for llama.cpp (``--lora``, llama-cpp-python's ``lora_path``)
beside a base GGUF (``export_gguf(..., merge_adapters=False)``).

Keys: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``; tensors
``blk.N.<name>.weight.lora_a`` (A, [r, in]) and ``.lora_b`` (B, [out, r]) for each adapted linear, named as
the base's tensors. llama.cpp scales each pair by alpha / r (r read from B); when the adapter's scaling is not
one alpha / r for every module (rsLoRA, mixed ranks or alphas, Phi's fused tensors), each module's scaling is
folded into its B and alpha is written as 0, which llama.cpp reads as a scale of 1. For the llama
architecture B's rows follow the base's q/k permutation; Phi-3's q/k/v and gate/up adapters become one pair
on the fused tensor (A stacked, B block-diagonal).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import KindredValueError
from ..nn import lora_modules
from .gguf import _ARCH, check_model, check_output, permute_qk, permutes_qk, tensor_names, write_tensors
from .gguf_types import LORA_TYPES

_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _pairs(model, adapter: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float, int]], bool]:
    """module name -> (A, B, scaling, r) of ``adapter``, and whether one alpha / r holds for all of them."""
    found = {}
    for name, m in lora_modules(model).items():
        if adapter in m.r:
            a = m.lora_A[adapter].weight.detach().float().cpu()
            b = m.lora_B[adapter].weight.detach().float().cpu()
            found[name] = (a, b, m.scaling[adapter], m.r[adapter])
    if not found:
        raise KindredValueError(f"model: no LoRA adapter named {adapter!r} to export")
    alphas = {s * r for _, _, s, r in found.values()}
    uniform = len(alphas) == 1 and all(
        m.use_rslora.get(adapter) is False for m in lora_modules(model).values() if adapter in m.r
    )
    return found, uniform


def _fuse(model, pairs: dict) -> dict:
    """Phi-3: one (A, B) per fused tensor, scalings folded into B; missing parts contribute zeros."""
    out = {}
    for name, (a, b, s, r) in pairs.items():
        prefix, _, leaf = name.rpartition(".")
        fused = next((f for f, parts in _FUSED.items() if leaf in parts), None)
        if fused is None:
            out[name] = (a, b * s, 1.0, r)
            continue
        target = f"{prefix}.{fused}"
        if target in out:
            continue
        parts = [model.get_submodule(f"{prefix}.{p}") for p in _FUSED[fused]]
        blocks = [pairs.get(f"{prefix}.{p}") for p in _FUSED[fused]]
        in_f = parts[0].in_features
        a_all = torch.cat([blk[0] if blk else torch.zeros(0, in_f) for blk in blocks])
        rows = [p.out_features for p in parts]
        ranks = [blk[0].shape[0] if blk else 0 for blk in blocks]
        b_all = torch.zeros(sum(rows), sum(ranks))
        r0 = c0 = 0
        for blk, n, k in zip(blocks, rows, ranks, strict=True):
            if blk:
                b_all[r0 : r0 + n, c0 : c0 + k] = blk[1] * blk[2]
            r0, c0 = r0 + n, c0 + k
        out[target] = (a_all, b_all, 1.0, sum(ranks))
    return out


def export_gguf_lora(
    model, path: str | Path, *, dtype: str = "F16", adapter: str | None = None, overwrite: bool = False
) -> Path:
    """Write the LoRA adapter ``adapter`` (default: the active one) of ``model`` to ``path`` as a GGUF LoRA.

    ``dtype``: the type of the A and B tensors (LORA_TYPES; Q8_0 needs r and in_features multiples of 32).
    """
    import gguf

    path = check_output(path, overwrite)
    check_model(model)
    dtype = str(dtype).upper()
    if dtype not in LORA_TYPES:
        raise KindredValueError(
            f"dtype: {dtype!r} is not a GGUF LoRA tensor type; known: {', '.join(LORA_TYPES)}"
        )
    cfg = model.config
    mods = lora_modules(model)
    name = adapter or next((m.active_adapter for m in mods.values()), "default")
    pairs, uniform = _pairs(model, name)
    fold = cfg.model_type == "phi3" or not uniform
    if fold:
        pairs = (
            _fuse(model, pairs)
            if cfg.model_type == "phi3"
            else {n: (a, b * s, 1.0, r) for n, (a, b, s, r) in pairs.items()}
        )
    alpha = 0.0 if fold else next(iter(pairs.values()))[2] * next(iter(pairs.values()))[3]
    names = tensor_names(cfg)
    tensors = {}
    for module, (a, b, _, _) in sorted(pairs.items()):
        gname = names.get_name(module)
        if gname is None:
            raise KindredValueError(
                f"{module}: no GGUF tensor name for this adapted module ({cfg.model_type})"
            )
        if permutes_qk(cfg) and module.endswith(("q_proj", "k_proj")):
            b = permute_qk(b, cfg.num_heads if module.endswith("q_proj") else cfg.num_kv_heads)
        tensors[f"{gname}.weight.lora_a"] = a.contiguous()
        tensors[f"{gname}.weight.lora_b"] = b.contiguous()
    if dtype == "Q8_0":
        bad = [n for n, t in tensors.items() if t.shape[-1] % 32]
        if bad:
            raise KindredValueError(
                f"dtype Q8_0: {bad[0]} has {tensors[bad[0]].shape[-1]} columns, not a multiple of 32"
            )
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[_ARCH[cfg.model_type]]]
    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    write_tensors(w, tensors, dict.fromkeys(tensors, dtype), tmp, path)
    return path
