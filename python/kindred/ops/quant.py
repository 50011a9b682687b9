"""Functional API of the quant family: NF4 (bitsandbytes layout) and INT4g (AWQ-compatible) weights.

The formats themselves are defined once in ``csrc/include/kindred/formats.h``; this module holds the
containers that keep a quantized tensor's pieces together, validates arguments by name and calls the
``kindred::*`` custom ops.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .. import _core, _ops, _ops_matmul
from ..errors import KindredValueError

NF4_CODEBOOK: tuple[float, ...] = tuple(_core.NF4_CODEBOOK)
DYNAMIC_MAP: tuple[float, ...] = tuple(_core.DYNAMIC_MAP)
NF4_DEFAULT_BLOCKSIZE: int = _core.NF4_DEFAULT_BLOCKSIZE
INT4G_DEFAULT_GROUP: int = _core.INT4G_DEFAULT_GROUP
INT4G_GROUPS: tuple[int, ...] = tuple(_core.INT4G_GROUPS)
AWQ_ORDER: tuple[int, ...] = tuple(_core.AWQ_ORDER)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """An NF4-quantized tensor in bitsandbytes' layout (see formats.h).

    ``absmax`` is f32 [blocks] or, with double quantization, u8 codes into ``nested_code`` scaled by
    ``nested_absmax`` per 256 blocks plus ``offset``.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: torch.Tensor | None
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict[str, torch.Tensor]:
        fields = ("packed", "absmax", "nested_absmax", "nested_code", "offset")
        return {f: getattr(self, f) for f in fields if getattr(self, f) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / math.prod(self.shape)

    def to(self, device: torch.device | str) -> NF4Weight:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype, out)


@dataclasses.dataclass(frozen=True)
class Int4gWeight:
    """An INT4g-quantized [N, K] weight in kindred's layout: w ≈ (q − zero) · scale per group of K."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], self.packed.shape[1] * 2)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales": self.scales, "zeros": self.zeros}

    @property
    def nbytes(self) -> int:
        # The zero point is a 4-bit value stored in a byte here; count it as 4 bits, as AWQ packs it.
        return self.packed.numel() + 2 * self.scales.numel() + self.zeros.numel() // 2

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / math.prod(self.shape)

    def to(self, device: torch.device | str) -> Int4gWeight:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize_int4g(self, dtype, out)


def _check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor):
        raise KindredValueError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise KindredValueError(f"{name} must be float32, float16 or bfloat16, got {weight.dtype}")
    if not weight.is_contiguous():
        raise KindredValueError(
            f"{name} must be contiguous (call .contiguous() first), got strides {weight.stride()}"
        )
    if weight.is_cuda and not bool(torch.isfinite(weight).all()):
        bad = int(torch.nonzero(~torch.isfinite(weight.reshape(-1)))[0])
        raise KindredValueError(f"{name} holds a non-finite value at flat index {bad}")


def _out_dtype(dtype: torch.dtype | None, default: torch.dtype) -> torch.dtype:
    dtype = default if dtype is None else dtype
    if dtype not in _FLOAT_DTYPES:
        raise KindredValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = NF4_DEFAULT_BLOCKSIZE, double_quant: bool = True
) -> NF4Weight:
    """Quantize ``weight`` (any shape, numel a multiple of ``blocksize``) to NF4 as bitsandbytes does."""
    _check_weight(weight)
    packed, absmax, nested_absmax, offset = _ops.quantize_nf4(weight, blocksize, double_quant)
    nested_code = _ops.dynamic_map(weight.device) if double_quant else None
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


def _check_out(out: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(out, torch.Tensor):
        raise KindredValueError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) and not (out.is_contiguous() and out.numel() == math.prod(shape)):
        raise KindredValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.device != device:
        raise KindredValueError(f"out is on {out.device} but the quantized weight is on {device}")


def dequantize_nf4(
    q: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The dense tensor ``q`` stands for, in ``dtype`` (default: the dtype it was quantized from).

    With ``out`` (contiguous, or [N, K] with strided rows, e.g. ``workspace[:, :K]``) it is written there.
    """
    if not isinstance(q, NF4Weight):
        raise KindredValueError(f"q must be an NF4Weight, got {type(q).__name__}")
    if out is not None:
        _check_out(out, q.shape, q.device)
        _ops.dequantize_nf4_out(
            out, q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize
        )
        return out
    return _ops.dequantize_nf4(
        q.packed,
        q.absmax,
        q.nested_absmax,
        q.nested_code,
        q.offset,
        q.blocksize,
        list(q.shape),
        _out_dtype(dtype, q.dtype),
    )


def quantize_int4g(weight: torch.Tensor, group_size: int = INT4G_DEFAULT_GROUP) -> Int4gWeight:
    """Quantize an [N, K] weight to INT4 group-wise asymmetric (AWQ's rounding rule, fp16 scales)."""
    _check_weight(weight)
    if weight.is_cuda:
        lo, hi = torch.aminmax(weight.float().reshape(weight.shape[0], -1), dim=1)
        if bool(((hi - lo) > 65504.0 * 15).any()):
            raise KindredValueError("weight spans a range too large for an fp16 scale (max 65504 * 15)")
    packed, scales, zeros = _ops.quantize_int4g(weight, group_size)
    return Int4gWeight(packed, scales, zeros, group_size, weight.dtype)


def dequantize_int4g(
    q: Int4gWeight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The dense [N, K] weight ``q`` stands for, in ``dtype`` (default: the dtype it was quantized from).

    With ``out`` (contiguous, or [N, K] with strided rows) it is written there.
    """
    if not isinstance(q, Int4gWeight):
        raise KindredValueError(f"q must be an Int4gWeight, got {type(q).__name__}")
    if q.packed.dim() != 2:
        raise KindredValueError(f"packed must be 2-D [N, K/2], got shape {tuple(q.packed.shape)}")
    if out is not None:
        _check_out(out, q.shape, q.device)
        _ops.dequantize_int4g_out(out, q.packed, q.scales, q.zeros, q.group_size)
        return out
    return _ops.dequantize_int4g(q.packed, q.scales, q.zeros, q.group_size, _out_dtype(dtype, q.dtype))


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
    _core.awq_pack(
        _ops.view(src.packed, "packed"),
        _ops.view(src.scales, "scales"),
        _ops.view(src.zeros, "zeros"),
        g,
        _ops.view(qweight),
        _ops.view(qzeros),
        _ops.view(scales),
    )
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
    _core.awq_unpack(
        *(_ops.view(t, name) for name, t in src.items()),
        group_size,
        _ops.view(packed),
        _ops.view(out_scales),
        _ops.view(zeros),
    )
    return Int4gWeight(packed, out_scales, zeros, group_size, dtype).to(qweight.device)


@dataclasses.dataclass(frozen=True)
class DecodeWeight:
    """A 4-bit [N, K] weight repacked for the CUDA decode kernel (layout: kindred/quant.h), lossless.

    ``period`` is the K span of one scale (min(blocksize, 128) for NF4, the group size for INT4g);
    ``blocksize`` that of the source, which ``unpack_decode`` restores.
    """

    data: torch.Tensor
    fmt: str
    shape: tuple[int, int]
    period: int
    blocksize: int
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device: torch.device | str) -> DecodeWeight:
        return dataclasses.replace(self, data=self.data.to(device))


def decode_eligible(w: NF4Weight | Int4gWeight) -> bool:
    """Whether ``w`` has a decode layout: a 2-D weight with in_features % 128 == 0."""
    return len(w.shape) == 2 and w.shape[1] % 128 == 0


def repack_decode(w: NF4Weight | Int4gWeight) -> DecodeWeight:
    """``w`` repacked for the decode kernel (done once, on the CPU; the result is on ``w``'s device)."""
    if not isinstance(w, (NF4Weight, Int4gWeight)):
        raise KindredValueError(f"w must be an NF4Weight or Int4gWeight, got {type(w).__name__}")
    if not decode_eligible(w):
        raise KindredValueError(f"w must be 2-D with in_features % 128 == 0, got shape {tuple(w.shape)}")
    n, k = w.shape
    src = w.to("cpu")
    if isinstance(w, NF4Weight):
        fmt, period, blocksize = "nf4", min(w.blocksize, 128), w.blocksize
    else:
        fmt, period, blocksize = "int4g", w.group_size, w.group_size
    data = torch.empty(_core.decode_bytes(_ops_matmul.DECODE_FORMATS[fmt], n, k, period), dtype=torch.uint8)
    if isinstance(src, NF4Weight):
        _core.repack_decode_nf4(
            _ops.view(src.packed, "packed"),
            _ops.view(src.absmax, "absmax"),
            _ops.opt_view(src.nested_absmax, "nested_absmax"),
            _ops.opt_view(src.nested_code, "nested_code"),
            _ops.opt_view(src.offset, "offset"),
            blocksize,
            n,
            k,
            _ops.view(data),
        )
    else:
        _core.repack_decode_int4g(
            _ops.view(src.packed, "packed"),
            _ops.view(src.scales, "scales"),
            _ops.view(src.zeros, "zeros"),
            blocksize,
            _ops.view(data),
        )
    return DecodeWeight(data.to(w.device), fmt, (n, k), period, blocksize, w.dtype)


def unpack_decode(d: DecodeWeight) -> NF4Weight | Int4gWeight:
    """The canonical weight of a decode layout. NF4 comes back with an f32 absmax: the stored one, or the
    double-quantized one expanded exactly as ``dequantize_nf4`` expands it."""
    if not isinstance(d, DecodeWeight):
        raise KindredValueError(f"d must be a DecodeWeight, got {type(d).__name__}")
    n, k = d.shape
    data = d.data.cpu()
    if d.fmt == "nf4":
        packed = torch.empty(n * k // 2, dtype=torch.uint8)
        absmax = torch.empty(n * k // d.blocksize, dtype=torch.float32)
        _core.unpack_decode_nf4(_ops.view(data), n, k, d.blocksize, _ops.view(packed), _ops.view(absmax))
        q = NF4Weight(packed, absmax, None, None, None, d.blocksize, (n, k), d.dtype)
    else:
        packed = torch.empty(n, k // 2, dtype=torch.uint8)
        scales = torch.empty(n, k // d.blocksize, dtype=torch.float16)
        zeros = torch.empty(n, k // d.blocksize, dtype=torch.uint8)
        _core.unpack_decode_int4g(
            _ops.view(data), n, k, d.blocksize, _ops.view(packed), _ops.view(scales), _ops.view(zeros)
        )
        q = Int4gWeight(packed, scales, zeros, d.blocksize, d.dtype)
    return q.to(d.device)


def _decode_applies(x2: torch.Tensor, decode: DecodeWeight | None) -> bool:
    """Whether the decode kernel runs for the 2-D input ``x2`` (inference, CUDA, at most 16 rows)."""
    return (
        decode is not None
        and x2.is_cuda
        and x2.shape[0] <= _ops_matmul.DECODE_MAX_ROWS
        and x2.dtype in (torch.bfloat16, torch.float16)
        and not (torch.is_grad_enabled() and x2.requires_grad)
    )


def matmul_4bit_decode(x: torch.Tensor, d: DecodeWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x · dequant(W)ᵀ (+ bias) from W's decode layout; x [..., K]. Inference only (no autograd).

    CUDA: at most 16 rows of bf16/f16 (the streaming decode kernel); CPU: any rows (the layout's reference).
    """
    if not isinstance(d, DecodeWeight):
        raise KindredValueError(f"d must be a DecodeWeight, got {type(d).__name__}")
    n, k = d.shape
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != k:
        raise KindredValueError(f"x must be a tensor of shape [..., {k}], got {getattr(x, 'shape', x)}")
    if torch.is_grad_enabled() and x.requires_grad:
        raise KindredValueError("x requires grad: the decode layout is inference-only, use matmul_4bit")
    if x.device != d.device:
        raise KindredValueError(f"x is on {x.device} but the weight is on {d.device}")
    x2 = x.reshape(-1, k).contiguous()
    fmt = _ops_matmul.DECODE_FORMATS[d.fmt]
    y = _ops_matmul.matmul_4bit_decode(x2, d.data, fmt, n, k, d.period)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


def matmul_4bit(
    x: torch.Tensor,
    w: NF4Weight | Int4gWeight,
    bias: torch.Tensor | None = None,
    decode: DecodeWeight | None = None,
) -> torch.Tensor:
    """x · dequant(w)ᵀ (+ bias) for x of any leading shape [..., K] and a frozen 4-bit [N, K] weight.

    Differentiable in x (and bias); fp32 accumulation. On CUDA, up to 16 rows take a decode kernel: the
    streaming one when ``decode`` (``repack_decode(w)``) is given and no gradient is needed, else the one
    that reads the canonical layout; more rows dequantize + one cuBLAS GEMM. On the CPU the Eigen path runs.
    """
    if not isinstance(x, torch.Tensor):
        raise KindredValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(w, (NF4Weight, Int4gWeight)) or len(w.shape) != 2:
        raise KindredValueError(f"w must be a 2-D NF4Weight or Int4gWeight, got {type(w).__name__}")
    n, k = w.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise KindredValueError(
            f"x must have shape [..., {k}] (the weight's in_features), got {tuple(x.shape)}"
        )
    if x.dtype not in (*_FLOAT_DTYPES, torch.float64):
        raise KindredValueError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.device != w.device:
        raise KindredValueError(f"x is on {x.device} but the weight is on {w.device}")
    x2 = x.reshape(-1, k).contiguous()
    if _decode_applies(x2, decode):
        if decode.shape != (n, k):
            raise KindredValueError(f"decode has shape {decode.shape}, the weight {(n, k)}")
        y = _ops_matmul.matmul_4bit_decode(
            x2, decode.data, _ops_matmul.DECODE_FORMATS[decode.fmt], n, k, decode.period
        )
    elif isinstance(w, NF4Weight):
        y = _ops_matmul.matmul_4bit_nf4(
            x2, w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset, w.blocksize, n
        )
    else:
        y = _ops_matmul.matmul_4bit_int4g(x2, w.packed, w.scales, w.zeros, w.group_size)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)
