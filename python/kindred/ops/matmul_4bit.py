"""Functional API of the matmul_4bit family: x · dequant(W)ᵀ for a frozen 4-bit W, and the decode layout.

``matmul_4bit`` takes an NF4Weight / Int4gWeight (differentiable in x); ``repack_decode`` builds W's decode
layout once (a DecodeWeight, layout in ``csrc/include/kindred/matmul_4bit.h``) for the CUDA decode kernel,
which ``matmul_4bit(..., decode=d)`` and ``matmul_4bit_decode`` use. The custom ops are in
``kindred._ops.matmul_4bit``, with ``decode_eligible``, the rule for when the decode kernel runs.
"""

from __future__ import annotations

import torch

from .. import _core
from .._ops import matmul_4bit as _matmul
from .._ops.adapter import view
from .._ops.quant import core_weight
from ..errors import KindredValueError
from ..weights import DecodeWeight, Int4gWeight, NF4Weight

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_bias(bias, n: int, x: torch.Tensor) -> None:
    """bias must be [N] on x's device: a [1] or [rows, N] one would broadcast into a wrong result."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
        got = getattr(bias, "shape", bias)
        raise KindredValueError(f"bias must have shape [{n}] (out_features), got {got}")
    if bias.device != x.device:
        raise KindredValueError(f"bias is on {bias.device} but x is on {x.device}")
    if not bias.dtype.is_floating_point:
        raise KindredValueError(f"bias must be a floating-point tensor, got {bias.dtype}")


def has_decode_layout(w: NF4Weight | Int4gWeight) -> bool:
    """Whether ``w`` can be repacked for decoding: 2-D, its in_features whole 128-wide chunks."""
    return len(w.shape) == 2 and w.shape[1] % _matmul.DECODE_CHUNK == 0


def repack_decode(w: NF4Weight | Int4gWeight) -> DecodeWeight:
    """``w`` repacked for the decode kernel (done once, on the CPU; the result is on ``w``'s device)."""
    if not isinstance(w, (NF4Weight, Int4gWeight)):
        raise KindredValueError(f"w must be an NF4Weight or Int4gWeight, got {type(w).__name__}")
    if not has_decode_layout(w):
        raise KindredValueError(f"w must be 2-D with in_features % 128 == 0, got shape {tuple(w.shape)}")
    n, k = w.shape
    src = w.to("cpu")
    if isinstance(w, NF4Weight):
        fmt, period, blocksize = "nf4", min(w.blocksize, _matmul.DECODE_CHUNK), w.blocksize
    else:
        fmt, period, blocksize = "int4g", w.group_size, w.group_size
    code = _matmul.DECODE_FORMATS[fmt]
    data = torch.empty(_core.decode_bytes(code, n, k, period), dtype=torch.uint8)
    layout = _core.DecodeWeight(view(data), code, n, k, period)
    if isinstance(src, NF4Weight):
        _core.repack_decode(core_weight(*src.op_args()), n, layout)
    else:
        _core.repack_decode(core_weight(*src.op_args()), layout)
    return DecodeWeight(data.to(w.device), fmt, (n, k), period, blocksize, w.dtype)


def unpack_decode(d: DecodeWeight) -> NF4Weight | Int4gWeight:
    """The canonical weight of a decode layout. NF4 comes back with an f32 absmax: the stored one, or the
    double-quantized one expanded exactly as ``dequantize_nf4`` expands it."""
    if not isinstance(d, DecodeWeight):
        raise KindredValueError(f"d must be a DecodeWeight, got {type(d).__name__}")
    n, k = d.shape
    data, code, _, _, period = d.op_args()
    data = data.cpu()
    layout = _core.DecodeWeight(view(data), code, n, k, period)
    if d.fmt == "nf4":
        packed = torch.empty(n * k // 2, dtype=torch.uint8)
        absmax = torch.empty(n * k // d.blocksize, dtype=torch.float32)
        q = NF4Weight(packed, absmax, None, None, None, d.blocksize, (n, k), d.dtype)
    else:
        packed = torch.empty(n, k // 2, dtype=torch.uint8)
        scales = torch.empty(n, k // d.blocksize, dtype=torch.float16)
        zeros = torch.empty(n, k // d.blocksize, dtype=torch.uint8)
        q = Int4gWeight(packed, scales, zeros, d.blocksize, d.dtype)
    _core.unpack_decode(layout, core_weight(*q.op_args()))
    return q.to(d.device)


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
    _check_bias(bias, n, x)
    y = _matmul.matmul_4bit_decode(x.reshape(-1, k).contiguous(), *d.op_args())
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

    Differentiable in x (and bias); fp32 accumulation. On CUDA, the streaming decode kernel runs when
    ``decode`` (``repack_decode(w)``) is given and ``decode_eligible`` holds (at most 16 rows of bf16/f16,
    no gradient); otherwise W is dequantized for one cuBLAS GEMM. On the CPU the Eigen path runs.
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
    _check_bias(bias, n, x)
    if decode is not None and _matmul.decode_eligible(x2, x2.shape[0], k):
        if decode.shape != (n, k):
            raise KindredValueError(f"decode has shape {decode.shape}, the weight {(n, k)}")
        y = _matmul.matmul_4bit_decode(x2, *decode.op_args())
    else:
        y = _matmul.matmul_4bit(x2, *w.op_args(), n)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)
