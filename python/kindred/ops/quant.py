"""Functional API of the quant family: NF4 (bitsandbytes layout) and INT4g (AWQ-compatible) weights.

The formats themselves are defined once in ``csrc/include/kindred/formats.h``; the containers that keep a
quantized tensor's pieces together are in ``kindred.weights``. This module validates arguments by name and
calls the ``kindred::*`` custom ops (``kindred._ops.quant``).
"""

from __future__ import annotations

import torch

from .. import _core
from .._ops import quant as _quant
from .._ops.adapter import view
from ..errors import KindredValueError
from ..weights import Int4gWeight, NF4Weight

NF4_CODEBOOK: tuple[float, ...] = tuple(_core.NF4_CODEBOOK)
DYNAMIC_MAP: tuple[float, ...] = tuple(_core.DYNAMIC_MAP)
NF4_DEFAULT_BLOCKSIZE: int = _core.NF4_DEFAULT_BLOCKSIZE
INT4G_DEFAULT_GROUP: int = _core.INT4G_DEFAULT_GROUP
INT4G_GROUPS: tuple[int, ...] = tuple(_core.INT4G_GROUPS)
AWQ_ORDER: tuple[int, ...] = tuple(_core.AWQ_ORDER)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor):
        raise KindredValueError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise KindredValueError(f"{name} must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.numel() == 0:
        raise KindredValueError(f"{name} must be non-empty, got shape {tuple(weight.shape)}")
    if not weight.is_contiguous():
        raise KindredValueError(
            f"{name} must be contiguous (call .contiguous() first), got strides {weight.stride()}"
        )
    if weight.is_cuda and not bool(torch.isfinite(weight).all()):
        bad = int(torch.nonzero(~torch.isfinite(weight.reshape(-1)))[0])
        raise KindredValueError(f"{name} holds a non-finite value at flat index {bad}")


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = NF4_DEFAULT_BLOCKSIZE, double_quant: bool = True
) -> NF4Weight:
    """Quantize ``weight`` (any shape, numel a multiple of ``blocksize``) to NF4 as bitsandbytes does."""
    _check_weight(weight)
    packed, absmax, nested_absmax, offset = _quant.quantize_nf4(weight, blocksize, double_quant)
    nested_code = _quant.dynamic_map(weight.device) if double_quant else None
    return NF4Weight(
        packed,
        absmax,
        nested_absmax if double_quant else None,
        nested_code,
        offset if double_quant else None,
        blocksize,
        tuple(weight.shape),
        weight.dtype,
    )


def dequantize_nf4(
    q: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The dense tensor ``q`` stands for, in ``dtype`` (default: the dtype it was quantized from).

    With ``out`` (contiguous, or [N, K] with strided rows, e.g. ``workspace[:, :K]``) it is written there.
    """
    if not isinstance(q, NF4Weight):
        raise KindredValueError(f"q must be an NF4Weight, got {type(q).__name__}")
    return q.dequantize(dtype, out)


def quantize_int4g(weight: torch.Tensor, group_size: int = INT4G_DEFAULT_GROUP) -> Int4gWeight:
    """Quantize an [N, K] weight to INT4 group-wise asymmetric (AWQ's rounding rule, fp16 scales)."""
    _check_weight(weight)
    if weight.is_cuda:
        lo, hi = torch.aminmax(weight.float().reshape(weight.shape[0], -1), dim=1)
        if bool(((hi - lo) > 65504.0 * 15).any()):
            raise KindredValueError("weight spans a range too large for an fp16 scale (max 65504 * 15)")
    packed, scales, zeros = _quant.quantize_int4g(weight, group_size)
    return Int4gWeight(packed, scales, zeros, group_size, weight.dtype)


def dequantize_int4g(
    q: Int4gWeight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The dense [N, K] weight ``q`` stands for, in ``dtype`` (default: the dtype it was quantized from).

    With ``out`` (contiguous, or [N, K] with strided rows) it is written there.
    """
    if not isinstance(q, Int4gWeight):
        raise KindredValueError(f"q must be an Int4gWeight, got {type(q).__name__}")
    # Zero points are 4-bit codes stored one per byte; a larger one would silently shift the group's values
    # (checked here, once per call; the custom ops that models run take weights kindred built).
    if isinstance(q.zeros, torch.Tensor) and q.zeros.numel() and q.zeros.dtype == torch.uint8:
        over = torch.nonzero(q.zeros.reshape(-1) > 15)
        if over.numel():
            i = int(over[0])
            value = int(q.zeros.reshape(-1)[i])
            raise KindredValueError(f"zeros[{i}] = {value}: a zero point must be in [0, 15]")
    return q.dequantize(dtype, out)


def int4g_to_awq(q: Int4gWeight) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors of ``q``: qweight i32 [K, N/8], qzeros i32 [K/g, N/8], scales f16 [K/g, N]."""
    n, k = q.shape
    g = q.group_size
    if n % 8 or k % g:
        raise KindredValueError(f"AWQ needs out_features % 8 == 0 and in_features % {g} == 0, got [{n}, {k}]")
    src = q.to("cpu")
    qweight = torch.empty(k, n // 8, dtype=torch.int32)
    qzeros = torch.empty(k // g, n // 8, dtype=torch.int32)
    scales = torch.empty(k // g, n, dtype=torch.float16)
    _core.awq_pack(_quant.core_weight(*src.op_args()), view(qweight), view(qzeros), view(scales))
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales}


def int4g_from_awq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int = INT4G_DEFAULT_GROUP,
    dtype: torch.dtype = torch.float16,
) -> Int4gWeight:
    """The Int4gWeight of AutoAWQ GEMM tensors (lossless); ``dtype`` is what it dequantizes to by default."""
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise KindredValueError(
                f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}"
            )
    if not isinstance(group_size, int) or group_size not in INT4G_GROUPS:
        allowed = ", ".join(map(str, INT4G_GROUPS))
        raise KindredValueError(f"group_size must be one of {allowed}, got {group_size!r}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if k % group_size:
        raise KindredValueError(f"qweight has {k} input rows, not a multiple of group_size {group_size}")
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    out_scales = torch.empty(n, k // group_size, dtype=torch.float16)
    zeros = torch.empty(n, k // group_size, dtype=torch.uint8)
    # Keep the CPU copies referenced for the duration of the call: views hold raw pointers.
    src = {
        name: t.cpu().contiguous()
        for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales))
    }
    q = Int4gWeight(packed, out_scales, zeros, group_size, dtype)
    _core.awq_unpack(*(view(t, name) for name, t in src.items()), _quant.core_weight(*q.op_args()))
    return q.to(qweight.device)
