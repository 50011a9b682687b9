"""``kindred::matmul_4bit_{nf4,int4g}``: x · dequant(W)ᵀ for a frozen 4-bit W, with autograd for x.

Paths: CPU → the core's Eigen implementation; CUDA with at most 16 rows (bf16/f16, K % 128 == 0) → the
core's tensor-core decode kernel, which streams the 4-bit weight once; CUDA otherwise → dequantize into a
fresh bf16/f16 workspace (≈2.6 TB/s on an H100) and one cuBLAS GEMM. Backward: dX = dY · dequant(W),
dequantizing again rather than keeping a dense copy (no dW: the base weight is frozen).

``kindred::matmul_4bit_decode`` reads a weight repacked for decoding (``ops.quant.repack_decode``): on CUDA
the streaming decode kernel (M <= 16, bf16/f16), on the CPU the reference of that layout. Inference only.
"""

from __future__ import annotations

import torch

from . import _core
from ._ops import dequantize_int4g, dequantize_nf4, opt_view, stream, view

DECODE_MAX_ROWS: int = _core.DECODE_MAX_ROWS


def _dense_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to dequantize to for activations of ``dtype`` (float64 reads the fp32 values exactly)."""
    return torch.float32 if dtype == torch.float64 else dtype


def _use_decode_kernel(x: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and x.shape[0] <= DECODE_MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.shape[1] % 128 == 0
    )


@torch.library.custom_op("kindred::matmul_4bit_nf4", mutates_args=())
def matmul_4bit_nf4(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    n: int,
) -> torch.Tensor:
    """x [M, K] · dequant(W)ᵀ for an NF4 W of shape [n, K]."""
    if x.dtype == torch.float64:  # the float64 reference (gradcheck): the fp32 dequantized values, exactly
        w = dequantize_nf4(
            packed, absmax, nested_absmax, nested_code, offset, blocksize, [n, x.shape[1]], torch.float32
        )
        return x @ w.double().t()
    if x.is_cuda and not _use_decode_kernel(x):
        w = dequantize_nf4(
            packed, absmax, nested_absmax, nested_code, offset, blocksize, [n, x.shape[1]], x.dtype
        )
        return x @ w.t()
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    _core.matmul_4bit_nf4(
        view(x, "x"),
        view(packed, "packed"),
        view(absmax, "absmax"),
        opt_view(nested_absmax, "nested_absmax"),
        opt_view(nested_code, "nested_code"),
        opt_view(offset, "offset"),
        blocksize,
        n,
        view(out, "out"),
        stream(x),
    )
    return out


@matmul_4bit_nf4.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, n):
    return x.new_empty(x.shape[0], n)


def _nf4_setup(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, n = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)
    ctx.meta = (blocksize, n, x.shape[1], x.dtype)


def _nf4_backward(ctx, grad):
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    blocksize, n, k, dtype = ctx.meta
    w = dequantize_nf4(
        packed, absmax, nested_absmax, nested_code, offset, blocksize, [n, k], _dense_dtype(dtype)
    )
    return grad @ w.to(dtype), None, None, None, None, None, None, None


matmul_4bit_nf4.register_autograd(_nf4_backward, setup_context=_nf4_setup)


@torch.library.custom_op("kindred::matmul_4bit_int4g", mutates_args=())
def matmul_4bit_int4g(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x [M, K] · dequant(W)ᵀ for an INT4g W of shape [N, K]."""
    if x.dtype == torch.float64:
        return x @ dequantize_int4g(packed, scales, zeros, group_size, torch.float32).double().t()
    if x.is_cuda and not _use_decode_kernel(x):
        return x @ dequantize_int4g(packed, scales, zeros, group_size, x.dtype).t()
    out = torch.empty(x.shape[0], packed.shape[0], dtype=x.dtype, device=x.device)
    _core.matmul_4bit_int4g(
        view(x, "x"),
        view(packed, "packed"),
        view(scales, "scales"),
        view(zeros, "zeros"),
        group_size,
        view(out, "out"),
        stream(x),
    )
    return out


@matmul_4bit_int4g.register_fake
def _(x, packed, scales, zeros, group_size):
    return x.new_empty(x.shape[0], packed.shape[0])


def _int4g_setup(ctx, inputs, output):
    x, packed, scales, zeros, group_size = inputs
    ctx.save_for_backward(packed, scales, zeros)
    ctx.meta = (group_size, x.dtype)


def _int4g_backward(ctx, grad):
    packed, scales, zeros = ctx.saved_tensors
    group_size, dtype = ctx.meta
    w = dequantize_int4g(packed, scales, zeros, group_size, _dense_dtype(dtype))
    return grad @ w.to(dtype), None, None, None, None


matmul_4bit_int4g.register_autograd(_int4g_backward, setup_context=_int4g_setup)


DECODE_FORMATS = {"nf4": 0, "int4g": 1}


@torch.library.custom_op("kindred::matmul_4bit_decode", mutates_args=())
def matmul_4bit_decode(
    x: torch.Tensor, data: torch.Tensor, fmt: int, n: int, k: int, period: int
) -> torch.Tensor:
    """x [M, K] · dequant(W)ᵀ for W [n, k] in the decode layout ``data`` (format ``fmt``)."""
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    _core.matmul_4bit_decode(view(x, "x"), view(data, "data"), fmt, n, k, period, view(out, "out"), stream(x))
    return out


@matmul_4bit_decode.register_fake
def _(x, data, fmt, n, k, period):
    return x.new_empty(x.shape[0], n)
