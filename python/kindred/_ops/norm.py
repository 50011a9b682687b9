"""The norm family of the core (``kindred/norm.h``): the training step's RMSNorm, forward and backward, in one
kernel each that reads and writes the activations' dtype with the arithmetic in float:
out = T(x · r · (offset + w)), r = 1 / sqrt(mean(x²) + eps); offset 0 is the Llama / Qwen scale, 1 Gemma's
(1 + w), without the float32 copies of ``F.rms_norm(x.float(), ..., 1 + w.float()).type_as(x)``.

``rms_norm`` is an autograd.Function: it saves x, w and the rows' r (float32; float64 for float64 x), and its
backward gives dx from the core; dw (torch ops, float32) only when w requires grad (kindred's LoRA training
freezes the norms). CPU: the core's reference, CUDA: its kernels; outputs are allocated here.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _core
from .adapter import rows, stream, view


def _rstd_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm_forward(
    x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [M, D], rstd [M]) for rows x [M, D] (unit column stride), w [D] in x's dtype or float32."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    rstd = x.new_empty(x.shape[0], dtype=_rstd_dtype(x))
    _core.rms_norm(view(x, "x"), view(w, "w"), eps, offset, view(out, "out"), view(rstd, "rstd"), stream(x))
    return out, rstd


def rms_norm_backward(
    dout: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, offset: float = 0.0
) -> torch.Tensor:
    """dx [M, D] for rows dout and x [M, D], the forward's w, rstd and offset."""
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    _core.rms_norm_backward(
        view(dout, "dout"), view(x, "x"), view(w, "w"), view(rstd, "rstd"), offset, view(dx, "dx"), stream(x)
    )
    return dx


class RmsNormFunction(torch.autograd.Function):
    """apply(x, w, eps, offset): rms_norm over x [..., D], differentiable in x and (if it requires grad) w."""

    @staticmethod
    def forward(ctx, x, w, eps, offset):
        x2 = rows(x)
        out, rstd = rms_norm_forward(x2, w, eps, offset)
        ctx.offset = offset
        ctx.save_for_backward(x2, w, rstd)
        return out.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x2, w, rstd = ctx.saved_tensors
        g = rows(dout)
        dx = rms_norm_backward(g, x2, w, rstd, ctx.offset) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:  # Σ_rows dout · x̂, in rstd's dtype (float32; float64 for float64 x)
            xhat = x2.to(rstd.dtype) * rstd[:, None]
            dw = (g.to(rstd.dtype) * xhat).sum(0).to(w.dtype)
        return None if dx is None else dx.view(dout.shape), dw, None, None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x / rms(x) · (offset + w) over the last dim of x [..., D] (offset 0: Llama / Qwen, 1: Gemma), in x's
    dtype; differentiable in x and w."""
    return RmsNormFunction.apply(x, w, eps, offset)
