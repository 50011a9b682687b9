"""Custom ops of the quant family: ``kindred::quantize_nf4``, ``kindred::dequantize_nf4``, their INT4g twins.

A 4-bit weight crosses every custom op as one argument ``base`` (a list of tensors) with its format and one
integer parameter, the form ``weights.NF4Weight.op_args()`` / ``Int4gWeight.op_args()`` hand over:
"nf4" → [packed, absmax, nested_absmax, nested_code, offset] (empty tensors for the three absent without
double quantization), param = blocksize; "int4g" → [packed, scales, zeros], param = group_size.
Each op has a fake implementation, so ``torch.compile`` traces through it; the real one hands TensorViews and
the current CUDA stream to the core.
"""

from __future__ import annotations

import functools
import math

import torch

from .. import _core
from ..errors import KindredValueError
from .adapter import stream, view

QUANT_FORMATS = ("nf4", "int4g")


def core_weight(base: list[torch.Tensor], fmt: str, param: int) -> _core.Nf4Tensors | _core.Int4gTensors:
    """The core's view of a 4-bit ``base`` (the tensors must outlive the call)."""
    if fmt == "nf4":
        names = ("nested_absmax", "nested_code", "offset")
        nested = [None if t.numel() == 0 else view(t, name) for t, name in zip(base[2:], names, strict=True)]
        return _core.Nf4Tensors(view(base[0], "packed"), view(base[1], "absmax"), *nested, param)
    packed, scales, zeros = base
    return _core.Int4gTensors(view(packed, "packed"), view(scales, "scales"), view(zeros, "zeros"), param)


@functools.cache
def dynamic_map(device: torch.device) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (formats.h) on ``device``."""
    return torch.tensor(_core.DYNAMIC_MAP, dtype=torch.float32, device=device)


def _nf4_blocks(weight: torch.Tensor, blocksize: int) -> int:
    return weight.numel() // blocksize if blocksize > 0 else 0


@torch.library.custom_op("kindred::quantize_nf4", mutates_args=())
def quantize_nf4(
    weight: torch.Tensor, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NF4 codes and scales of ``weight``: (packed u8 [n/2], absmax, nested_absmax, offset).

    absmax is f32 [blocks], or u8 [blocks] with double quantization; nested_absmax (f32 [ceil(blocks/256)])
    and offset (f32 [1]) are empty without it.
    """
    blocks = _nf4_blocks(weight, blocksize)
    dev = weight.device
    packed = torch.empty(weight.numel() // 2, dtype=torch.uint8, device=dev)
    if not double_quant:
        absmax = torch.empty(blocks, dtype=torch.float32, device=dev)
        out = _core.Nf4Tensors(view(packed), view(absmax), None, None, None, blocksize)
        _core.quantize_nf4(view(weight, "weight"), out, None, stream(weight))
        return packed, absmax, absmax.new_empty(0), absmax.new_empty(0)
    absmax = torch.empty(blocks, dtype=torch.uint8, device=dev)
    nested_absmax = torch.empty(math.ceil(blocks / _core.NESTED_BLOCKSIZE), dtype=torch.float32, device=dev)
    offset = torch.empty(1, dtype=torch.float32, device=dev)
    workspace = torch.empty(blocks, dtype=torch.float32, device=dev)
    out = _core.Nf4Tensors(
        view(packed), view(absmax), view(nested_absmax), view(dynamic_map(dev)), view(offset), blocksize
    )
    _core.quantize_nf4(view(weight, "weight"), out, view(workspace), stream(weight))
    return packed, absmax, nested_absmax, offset


@quantize_nf4.register_fake
def _(weight, blocksize, double_quant):
    blocks = _nf4_blocks(weight, blocksize)
    packed = weight.new_empty(weight.numel() // 2, dtype=torch.uint8)
    if not double_quant:
        return (
            packed,
            weight.new_empty(blocks, dtype=torch.float32),
            *(weight.new_empty(0, dtype=torch.float32),) * 2,
        )
    nested = math.ceil(blocks / _core.NESTED_BLOCKSIZE)
    return (
        packed,
        weight.new_empty(blocks, dtype=torch.uint8),
        weight.new_empty(nested, dtype=torch.float32),
        weight.new_empty(1, dtype=torch.float32),
    )


@torch.library.custom_op("kindred::dequantize_nf4", mutates_args=())
def dequantize_nf4(
    base: list[torch.Tensor], blocksize: int, shape: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """The dense tensor of ``shape`` and ``dtype`` that an "nf4" base stands for."""
    out = torch.empty(shape, dtype=dtype, device=base[0].device)
    dequantize_into(out, base, "nf4", blocksize)
    return out


@dequantize_nf4.register_fake
def _(base, blocksize, shape, dtype):
    return base[0].new_empty(shape, dtype=dtype)


@torch.library.custom_op("kindred::dequantize_nf4_out", mutates_args=("out",))
def dequantize_nf4_out(out: torch.Tensor, base: list[torch.Tensor], blocksize: int) -> None:
    """dequantize_nf4 into ``out``: contiguous, or a 2-D view with strided rows (a slice of a workspace)."""
    dequantize_into(out, base, "nf4", blocksize)


@torch.library.custom_op("kindred::quantize_int4g", mutates_args=())
def quantize_int4g(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """INT4g codes of an [N, K] weight: (packed u8 [N, K/2], scales f16 [N, K/g], zeros u8 [N, K/g])."""
    n, k = _int4g_dims(weight, group_size)
    dev = weight.device
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=dev)
    groups = k // group_size if group_size > 0 else 0
    scales = torch.empty(n, groups, dtype=torch.float16, device=dev)
    zeros = torch.empty(n, groups, dtype=torch.uint8, device=dev)
    out = _core.Int4gTensors(view(packed), view(scales), view(zeros), group_size)
    _core.quantize_int4g(view(weight, "weight"), out, stream(weight))
    return packed, scales, zeros


def _int4g_dims(weight: torch.Tensor, group_size: int) -> tuple[int, int]:
    if weight.dim() != 2:
        raise KindredValueError(
            f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}"
        )
    return weight.shape[0], weight.shape[1]


@quantize_int4g.register_fake
def _(weight, group_size):
    n, k = _int4g_dims(weight, group_size)
    groups = k // group_size
    return (
        weight.new_empty(n, k // 2, dtype=torch.uint8),
        weight.new_empty(n, groups, dtype=torch.float16),
        weight.new_empty(n, groups, dtype=torch.uint8),
    )


@torch.library.custom_op("kindred::dequantize_int4g", mutates_args=())
def dequantize_int4g(base: list[torch.Tensor], group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] weight that an "int4g" base stands for."""
    packed = base[0]
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=dtype, device=packed.device)
    dequantize_into(out, base, "int4g", group_size)
    return out


@dequantize_int4g.register_fake
def _(base, group_size, dtype):
    packed = base[0]
    return packed.new_empty(packed.shape[0], packed.shape[1] * 2, dtype=dtype)


@torch.library.custom_op("kindred::dequantize_int4g_out", mutates_args=("out",))
def dequantize_int4g_out(out: torch.Tensor, base: list[torch.Tensor], group_size: int) -> None:
    """dequantize_int4g into ``out`` ([N, K], contiguous or with strided rows)."""
    dequantize_into(out, base, "int4g", group_size)


def dequantize(base: list[torch.Tensor], fmt: str, param: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] (``shape``) weight of a 4-bit base in ``dtype``, through the format's custom op."""
    if fmt == "nf4":
        return dequantize_nf4(base, param, list(shape), dtype)
    return dequantize_int4g(base, param, dtype)


def dequantize_into(out: torch.Tensor, base: list[torch.Tensor], fmt: str, param: int) -> None:
    """out [N, K] = the dequantized base, written in place by the core (no custom-op dispatch; rows of ``out``
    may be strided). NF4 blocks that straddle rows cannot be written row by row: dequantized flat, copied."""
    if fmt == "nf4" and not out.is_contiguous() and out.shape[-1] % param:
        out.copy_(dequantize_nf4(base, param, list(out.shape), out.dtype))
        return
    w = core_weight(base, fmt, param)
    if fmt == "nf4":
        _core.dequantize_nf4(w, view(out, "out"), stream(out))
    else:
        _core.dequantize_int4g(w, view(out, "out"), stream(out))
