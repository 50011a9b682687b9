"""stacked_decode: several 4-bit projections of one input (q/k/v, gate/up) in one decode-kernel launch.

Their decode layouts are tile rows of 16 (kindred/matmul_4bit.h), so the layout of the weights stacked along
N is the concatenation of theirs. The first call rebinds each layer's decode buffer to a view of one new
buffer; later calls find the views back to back and launch once. Nothing is kept twice: each layer's own
forward reads the same view. A LoRA layer adds its s·(x·Aᵀ)·Bᵀ on top, as its own decode forward does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._ops.matmul_4bit import DECODE_ROW_PAD, decode_eligible, matmul_4bit_decode
from ..weights import DecodeWeight
from .linear4bit import Linear4bit
from .lora import LoraLinear


def stacked_decode(layers: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor] | None:
    """[layer(x) for layer in layers] from one launch over their stacked weights, or None where that cannot
    serve: a layer that is not a bias-free Linear4bit (or a LoraLinear over one, its adapter off or in its
    decode serving mode), layouts of different formats, K or periods, x not decode_eligible."""
    parts = [_base_and_adapter(m, x) for m in layers]
    if any(p is None for p in parts):
        return None
    bases = [p[0] for p in parts]
    k = bases[0].in_features
    if not decode_eligible(x, x.numel() // k, k) or any(b.in_features != k for b in bases):
        return None
    ds = [b.decode_weight() for b in bases]
    if any(d is None for d in ds) or len({(d.fmt, d.period, d.blocksize, d.dtype) for d in ds}) != 1:
        return None
    if not _consecutive(ds):
        if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return None
        data, at = torch.cat([d.data for d in ds]), 0
        for b, d in zip(bases, ds, strict=True):
            b.register_buffer("_decode_data", data[at : at + d.data.numel()], persistent=False)
            at += d.data.numel()
        ds = [b.decode_weight() for b in bases]
    start = ds[0].data.storage_offset()
    data = ds[0].data._base[start : start + sum(d.data.numel() for d in ds)]
    padded = [-(-d.shape[0] // DECODE_ROW_PAD) * DECODE_ROW_PAD for d in ds]
    _, fmt, _, _, period = ds[0].op_args()
    x2 = x.reshape(-1, k).contiguous()
    y = matmul_4bit_decode(x2, data, fmt, sum(padded), k, period)
    outs, at = [], 0
    for (_, lora), d, p in zip(parts, ds, padded, strict=True):
        out = y[:, at : at + d.shape[0]]
        if lora is not None:  # as LoraLinear's decode forward: the base's output, then addmm_ onto it
            a, b, scaling = lora
            out = out.contiguous().addmm_(x2 @ a.t(), b.t(), alpha=scaling)
        outs.append(out.reshape(*x.shape[:-1], d.shape[0]))
        at += p
    return outs


def _base_and_adapter(m: nn.Module, x: torch.Tensor):
    """(its Linear4bit, None or its LoRA (A, B, scaling)) for a layer stacked_decode serves; else None."""
    if isinstance(m, LoraLinear):
        base = m.base_layer
        if not isinstance(base, Linear4bit):
            return None
        if m.disabled or m.merged_adapter is not None:
            return (base, None) if base.bias is None else None
        name = m.active_adapter
        a, b = m.lora_A[name].weight, m.lora_B[name].weight
        if m.row_adapter is not None or not m._serves_decode(x, a) or base.bias is not None:
            return None
        return base, (a, b, m.scaling[name])
    if type(m) is Linear4bit and m.bias is None:
        return m, None
    return None


def _consecutive(ds: list[DecodeWeight]) -> bool:
    """Whether the layouts' data are back-to-back views of one 1-D buffer."""
    base = ds[0].data._base
    if base is None or base.dim() != 1:
        return False
    at = ds[0].data.storage_offset()
    for d in ds:
        if d.data._base is not base or d.data.storage_offset() != at:
            return False
        at += d.data.numel()
    return True
