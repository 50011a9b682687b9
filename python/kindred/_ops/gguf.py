"""The ``kindred::dequantize_gguf`` custom op: GGUF block dequantization through the core (CPU only)."""

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
