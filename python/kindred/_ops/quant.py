"""torch attached to the core: TensorViews for ``kindred._core`` and the ``kindred::*`` custom ops.

Each op is registered with ``torch.library.custom_op`` and a fake implementation, so ``torch.compile`` can
trace through it; the real implementation hands TensorViews and the current CUDA stream to the core.
"""

from __future__ import annotations

import functools
import math

import torch

from . import _core
from .errors import KindredValueError

_DTYPE_NAMES = {
    torch.uint8: "uint8",
    torch.int32: "int32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.int64: "int64",
}


def view(t: torch.Tensor, name: str = "tensor") -> _core.TensorView:
    """A TensorView of ``t`` (no copy); ``name`` goes into the error for an unsupported dtype."""
    if not isinstance(t, torch.Tensor):
        raise KindredValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtype = _DTYPE_NAMES.get(t.dtype)
    if dtype is None:
        raise KindredValueError(f"{name} has unsupported dtype {t.dtype}")
    device = t.device  # read once: each call builds a new torch.device (views are made per kernel call)
    return _core.TensorView(t.data_ptr(), dtype, t.shape, t.stride(), device.type, device.index or 0)


def opt_view(t: torch.Tensor | None, name: str) -> _core.TensorView | None:
    return None if t is None else view(t, name)


def stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


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
        _core.quantize_nf4(
            view(weight, "weight"),
            view(packed),
            view(absmax),
            None,
            None,
            None,
            None,
            blocksize,
            stream(weight),
        )
        return packed, absmax, absmax.new_empty(0), absmax.new_empty(0)
    absmax = torch.empty(blocks, dtype=torch.uint8, device=dev)
    nested_absmax = torch.empty(math.ceil(blocks / _core.NESTED_BLOCKSIZE), dtype=torch.float32, device=dev)
    offset = torch.empty(1, dtype=torch.float32, device=dev)
    workspace = torch.empty(blocks, dtype=torch.float32, device=dev)
    _core.quantize_nf4(
        view(weight, "weight"),
        view(packed),
        view(absmax),
        view(nested_absmax),
        view(dynamic_map(dev)),
        view(offset),
        view(workspace),
        blocksize,
        stream(weight),
    )
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
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The dense tensor of ``shape`` and ``dtype`` that NF4 codes and scales stand for."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    _dequantize_nf4_into(out, packed, absmax, nested_absmax, nested_code, offset, blocksize)
    return out


def _dequantize_nf4_into(out, packed, absmax, nested_absmax, nested_code, offset, blocksize) -> None:
    _core.dequantize_nf4(
        view(packed, "packed"),
        view(absmax, "absmax"),
        opt_view(nested_absmax, "nested_absmax"),
        opt_view(nested_code, "nested_code"),
        opt_view(offset, "offset"),
        blocksize,
        view(out, "out"),
        stream(packed),
    )


@dequantize_nf4.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("kindred::dequantize_nf4_out", mutates_args=("out",))
def dequantize_nf4_out(
    out: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
) -> None:
    """dequantize_nf4 into ``out``: contiguous, or a 2-D view with strided rows (a slice of a workspace)."""
    _dequantize_nf4_into(out, packed, absmax, nested_absmax, nested_code, offset, blocksize)


@torch.library.custom_op("kindred::quantize_int4g", mutates_args=())
def quantize_int4g(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """INT4g codes of an [N, K] weight: (packed u8 [N, K/2], scales f16 [N, K/g], zeros u8 [N, K/g])."""
    n, k = _int4g_dims(weight, group_size)
    dev = weight.device
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=dev)
    groups = k // group_size if group_size > 0 else 0
    scales = torch.empty(n, groups, dtype=torch.float16, device=dev)
    zeros = torch.empty(n, groups, dtype=torch.uint8, device=dev)
    _core.quantize_int4g(
        view(weight, "weight"), view(packed), view(scales), view(zeros), group_size, stream(weight)
    )
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
def dequantize_int4g(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """The dense [N, K] weight that INT4g codes stand for."""
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=dtype, device=packed.device)
    dequantize_int4g_out(out, packed, scales, zeros, group_size)
    return out


@dequantize_int4g.register_fake
def _(packed, scales, zeros, group_size, dtype):
    return packed.new_empty(packed.shape[0], packed.shape[1] * 2, dtype=dtype)


@torch.library.custom_op("kindred::dequantize_int4g_out", mutates_args=("out",))
def dequantize_int4g_out(
    out: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> None:
    """dequantize_int4g into ``out`` ([N, K], contiguous or with strided rows)."""
    _dequantize_int4g_into(out, packed, scales, zeros, group_size)


def _dequantize_int4g_into(out, packed, scales, zeros, group_size) -> None:
    _core.dequantize_int4g(
        view(packed, "packed"),
        view(scales, "scales"),
        view(zeros, "zeros"),
        group_size,
        view(out, "out"),
        stream(packed),
    )
