"""The ``kindred::dequantize_gguf`` and ``kindred::quantize_gguf`` custom ops: GGUF blocks through the core
(CPU only)."""

from __future__ import annotations

import torch

from .. import _core
from .adapter import view


@torch.library.custom_op("kindred::dequantize_gguf", mutates_args=())
def dequantize_gguf(blocks: torch.Tensor, ggml_type: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``numel`` values that the GGUF blocks (u8) of ``ggml_type`` stand for, flat, in ``dtype``."""
    out = torch.empty(numel, dtype=dtype, device=blocks.device)
    _core.dequantize_gguf(ggml_type, view(blocks, "blocks"), view(out, "dtype"))
    return out


@dequantize_gguf.register_fake
def _(blocks, ggml_type, numel, dtype):
    return blocks.new_empty(numel, dtype=dtype)


@torch.library.custom_op("kindred::quantize_gguf", mutates_args=())
def quantize_gguf(x: torch.Tensor, ggml_type: int, nbytes: int) -> torch.Tensor:
    """The ``nbytes`` GGUF bytes (u8, flat) of ``ggml_type`` that hold the values of ``x`` (flat order)."""
    out = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    _core.quantize_gguf(ggml_type, view(x, "x"), view(out, "blocks"))
    return out


@quantize_gguf.register_fake
def _(x, ggml_type, nbytes):
    return x.new_empty(nbytes, dtype=torch.uint8)
