"""Custom ops of the matmul_4bit family: ``kindred::matmul_4bit`` (x · dequant(W)ᵀ for a frozen 4-bit W, with
autograd for x) and ``kindred::matmul_4bit_decode`` (the same from W's decode layout, inference only).

Paths of ``matmul_4bit``: CPU → the core's Eigen implementation; CUDA → dequantize into a fresh bf16/f16
workspace (≈2.6 TB/s on an H100) and one cuBLAS GEMM. Backward: dX = dY · dequant(W), dequantizing again
rather than keeping a dense copy (no dW: the base weight is frozen). The weight is a base list in the form of
``kindred._ops.quant``.

``matmul_4bit_decode`` reads a weight repacked for decoding (``ops.repack_decode``): on CUDA the streaming
decode kernel, on the CPU the reference of that layout. ``decode_eligible`` is the one statement of when the
CUDA decode kernel serves a call.
"""

from __future__ import annotations

import torch

from .. import _core
from .adapter import stream, view
from .quant import core_weight, dequantize

DECODE_MAX_ROWS: int = _core.DECODE_MAX_ROWS
DECODE_CHUNK: int = _core.DECODE_CHUNK
DECODE_ROW_PAD: int = _core.DECODE_ROW_PAD  # a decode layout's N is padded to a multiple of this
DECODE_FORMATS = {"nf4": _core.DECODE_NF4, "int4g": _core.DECODE_INT4G}


def decode_eligible(x: torch.Tensor, rows: int, k: int) -> bool:
    """Whether the CUDA decode kernel serves ``rows`` rows of ``x`` against in_features ``k``: on CUDA, at
    most DECODE_MAX_ROWS rows of bf16 / f16, k a multiple of DECODE_CHUNK, and no gradient wanted (the
    kernel has no backward). The core enforces the same limits (csrc/matmul_4bit.cpp)."""
    return (
        x.is_cuda
        and rows <= DECODE_MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and k % DECODE_CHUNK == 0
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def _dense_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to dequantize to for activations of ``dtype`` (float64 reads the fp32 values exactly)."""
    return torch.float32 if dtype == torch.float64 else dtype


@torch.library.custom_op("kindred::matmul_4bit", mutates_args=())
def matmul_4bit(
    x: torch.Tensor, base: list[torch.Tensor], base_format: str, base_param: int, n: int
) -> torch.Tensor:
    """x [M, K] · dequant(W)ᵀ for a 4-bit W of shape [n, K]."""
    k = x.shape[1]
    if x.dtype == torch.float64:  # the float64 reference (gradcheck): the fp32 dequantized values, exactly
        return x @ dequantize(base, base_format, base_param, (n, k), torch.float32).double().t()
    if x.is_cuda:
        return x @ dequantize(base, base_format, base_param, (n, k), x.dtype).t()
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    w = core_weight(base, base_format, base_param)
    if base_format == "nf4":
        _core.matmul_4bit(view(x, "x"), w, n, view(out, "out"), stream(x))
    else:
        _core.matmul_4bit(view(x, "x"), w, view(out, "out"), stream(x))
    return out


@matmul_4bit.register_fake
def _(x, base, base_format, base_param, n):
    return x.new_empty(x.shape[0], n)


def _setup(ctx, inputs, output):
    x, base, base_format, base_param, n = inputs
    ctx.save_for_backward(*base)
    ctx.meta = (base_format, base_param, n, x.shape[1], x.dtype)


def _backward(ctx, grad):
    base_format, base_param, n, k, dtype = ctx.meta
    base = list(ctx.saved_tensors)  # unpacked once: checkpointing allows a single unpack
    w = dequantize(base, base_format, base_param, (n, k), _dense_dtype(dtype))
    return grad @ w.to(dtype), [None] * len(base), None, None, None


matmul_4bit.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("kindred::matmul_4bit_decode", mutates_args=())
def matmul_4bit_decode(
    x: torch.Tensor, data: torch.Tensor, fmt: int, n: int, k: int, period: int
) -> torch.Tensor:
    """x [M, K] · dequant(W)ᵀ for W [n, k] in the decode layout ``data`` (format ``fmt``)."""
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    w = _core.DecodeWeight(view(data, "data"), fmt, n, k, period)
    _core.matmul_4bit_decode(view(x, "x"), w, view(out, "out"), stream(x))
    return out


@matmul_4bit_decode.register_fake
def _(x, data, fmt, n, k, period):
    return x.new_empty(x.shape[0], n)
