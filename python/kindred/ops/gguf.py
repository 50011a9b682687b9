"""Functional API of the gguf family: GGUF tensor data (llama.cpp's block formats) dequantized and quantized.

The block layouts are defined once in ``csrc/include/kindred/formats.h`` (GGUF section); Python reads the
table of supported types from the core.
"""

from __future__ import annotations

import math

import torch

from .. import _core
from .._ops import gguf as _gguf
from ..errors import KindredValueError

# name -> (ggml_type id, elements per block, bytes per block), from formats.h.
GGUF_BLOCK_TYPES: dict[str, tuple[int, int, int]] = {k: tuple(v) for k, v in _core.GGUF_BLOCK_TYPES.items()}
_BY_ID = {v[0]: (k, v[1], v[2]) for k, v in GGUF_BLOCK_TYPES.items()}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def gguf_type_name(ggml_type: int) -> str:
    """The name ("Q4_1", ...) of a block type kindred dequantizes and quantizes."""
    if ggml_type not in _BY_ID:
        raise KindredValueError(
            f"ggml_type {ggml_type} is not a block format kindred reads or writes; supported: "
            + ", ".join(f"{n} ({v[0]})" for n, v in GGUF_BLOCK_TYPES.items())
        )
    return _BY_ID[ggml_type][0]


def gguf_nbytes(ggml_type: int, numel: int) -> int:
    """Bytes of GGUF data holding ``numel`` elements of ``ggml_type``."""
    gguf_type_name(ggml_type)  # raises for an unsupported type
    _, elems, nbytes = _BY_ID[ggml_type]
    if numel <= 0 or numel % elems:
        raise KindredValueError(f"numel must be a positive multiple of {elems} for this type, got {numel}")
    return numel // elems * nbytes


def dequantize_gguf(
    blocks: torch.Tensor,
    ggml_type: int,
    shape: tuple[int, ...] | list[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The tensor of torch ``shape`` (GGUF dims reversed) that GGUF ``blocks`` of ``ggml_type`` stand for.

    ``blocks`` is the tensor's raw data (u8, CPU, any shape, contiguous). Values are bit-identical to
    llama.cpp's ``dequantize_row_*`` (computed in float32, then rounded to ``dtype``).
    """
    if not isinstance(blocks, torch.Tensor):
        raise KindredValueError(f"blocks must be a torch.Tensor, got {type(blocks).__name__}")
    if blocks.dtype != torch.uint8:
        raise KindredValueError(f"blocks must be uint8 (raw GGUF bytes), got {blocks.dtype}")
    if blocks.device.type != "cpu":
        raise KindredValueError(
            f"blocks must be on the CPU (dequantization runs at load time), got {blocks.device}"
        )
    if dtype not in _FLOAT_DTYPES:
        raise KindredValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise KindredValueError(f"shape must be non-empty with positive sizes, got {shape}")
    numel = math.prod(shape)
    expected = gguf_nbytes(ggml_type, numel)
    if blocks.numel() != expected:
        raise KindredValueError(
            f"blocks must hold {expected} bytes for {numel} {gguf_type_name(ggml_type)} elements, "
            f"got {blocks.numel()} (truncated tensor data or a wrong shape?)"
        )
    return _gguf.dequantize_gguf(blocks.contiguous(), ggml_type, numel, dtype).reshape(shape)


def quantize_gguf(x: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """GGUF blocks of ``ggml_type`` for ``x`` (float, CPU, last dimension a multiple of the block size), as
    uint8 of shape ``(*x.shape[:-1], row_bytes)`` (gguf-py's layout for ``GGUFWriter.add_tensor``).

    Byte-identical to llama.cpp's reference quantizers (``quantize_row_*_ref``, no importance matrix).
    """
    if not isinstance(x, torch.Tensor):
        raise KindredValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise KindredValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.device.type != "cpu":
        raise KindredValueError(f"x must be on the CPU (GGUF quantization runs at export), got {x.device}")
    name = gguf_type_name(ggml_type)
    _, elems, nbytes = _BY_ID[ggml_type]
    if x.dim() == 0 or x.numel() == 0 or x.shape[-1] % elems:
        raise KindredValueError(
            f"x: the last dimension must be a positive multiple of {elems} for {name}, "
            f"got shape {tuple(x.shape)}"
        )
    out = _gguf.quantize_gguf(x.contiguous(), ggml_type, x.numel() // elems * nbytes)
    return out.reshape(*x.shape[:-1], x.shape[-1] // elems * nbytes)
