"""The ``kindred::lora_*`` custom ops: y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ (+ bias) over a frozen W, and backward.

CPU: the C++ reference (csrc/cpu/lora_cpu.cpp). CUDA: cuBLAS GEMMs through torch (``forward_plan``,
``backward_plan``) plus kindred's dropout kernel, around a workspace W' = [W | s·B] of shape [N, K + r] (row
stride rounded up to 8 elements; a 4-bit W is dequantized into a scratch one shared by every layer):

- forward: xs = s·drop(x)·Aᵀ ([M, r]); y = xs·Bᵀ (+ bias), a skinny GEMM (inner size r) that writes y; then
  y += x·Wᵀ with addmm(beta=1), so the main GEMM reads y once in its epilogue. Only W is needed: B is not
  copied into the workspace, x is not copied either.
- backward: one GEMM dY·W' = [dY·W | g] with W' = [W | s·B], so g = s·dY·B; dX = its first K columns,
  += g·A in place (addmm, or through the dropout mask when p > 0); dA = gᵀ·drop(x); dB = dYᵀ·xs.

Saved for the backward: x (not drop(x): the mask is recomputed from its seed) and xs; g is recomputed as part
of the dX GEMM; nothing [M, N]-sized is kept.

Eager CUDA calls run through ``LoraLinearFunction`` (a plain autograd.Function around the same plan: the
custom op's dispatch costs more host time than the step's small ops); torch.compile and the CPU use the op.

Base formats: "dense" (base = [W]), "workspace" (base = [W'], a [N, >= K + r] buffer whose first K columns are
W: the backward writes s·B into columns K..K+r, which are scratch by contract), "nf4" (base = [packed, absmax,
nested_absmax, nested_code, offset], empty tensors for the absent ones, param = blocksize), "int4g" (base =
[packed, scales, zeros], param = group_size). A 4-bit base is dequantized into the shared scratch once in the
forward and once in the backward.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _core
from ..errors import KindredValueError
from .adapter import opt_view, stream, view
from .quant import dequantize, dequantize_into

BASE_FORMATS = ("dense", "workspace", "nf4", "int4g")
_SCRATCH: dict[tuple, torch.Tensor] = {}


def padded_width(k: int, r: int) -> int:
    """Row stride of a workspace for in_features k and rank r: k + r rounded up to 8 (16-byte bf16 rows)."""
    return (k + r + 7) // 8 * 8


def dense_base(fmt: str, base: list[torch.Tensor], param: int, n: int, k: int, dtype: torch.dtype):
    """The [N, K] base weight in ``dtype`` (a view for "dense" and "workspace"; dequantized otherwise)."""
    if fmt == "dense":
        return base[0]
    if fmt == "workspace":
        return base[0][:, :k]
    if dtype == torch.float64:  # the float64 reference path: dequantize exactly in float32, then widen
        return dequantize(base, fmt, param, (n, k), torch.float32).double()
    return dequantize(base, fmt, param, (n, k), dtype)


def _weight(fmt, base, param, n: int, k: int, r: int, like: torch.Tensor) -> torch.Tensor:
    """W [N, K]: a view of a dense or workspace base; a 4-bit base dequantized into the scratch workspace."""
    if fmt == "dense":
        return base[0]
    if fmt == "workspace":
        return base[0][:, :k]
    w = _scratch(n, padded_width(k, r), k, like)
    dequantize_into(w, base, fmt, param)
    return w


def _workspace(fmt, base, param, b: torch.Tensor, s: float, k: int) -> torch.Tensor:
    """W' = [W | s·B], [N, K + r] (row stride padded_width): W copied or dequantized in, then s·B."""
    n, r = b.shape
    if fmt == "workspace":
        ws = base[0][:, : k + r]
    else:
        ws = _scratch(n, padded_width(k, r), k + r, b)
        if fmt == "dense":
            ws[:, :k].copy_(base[0])
        else:
            dequantize_into(ws[:, :k], base, fmt, param)
    torch.mul(b, s, out=ws[:, k:])
    return ws


def _scratch(n: int, width: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """An [n, cols] view (row stride ``width``) of the one scratch buffer of like's device and dtype, grown to
    the largest layer.

    Layers run one after another on one stream, so each dequantizes into the same memory after the previous
    GEMM that read it was queued: a model costs one largest-layer workspace, not one per layer shape."""
    key = (like.device, like.dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n * width:
        buf = _SCRATCH[key] = torch.zeros(n * width, dtype=like.dtype, device=like.device)
    return buf.as_strided((n, cols), (width, 1))  # one view op: this runs twice per layer and step


def scratch_workspaces() -> dict[tuple, torch.Tensor]:
    """The shared scratch buffers, keyed by (device, dtype); for tests and memory accounting."""
    return _SCRATCH


@torch.library.custom_op("kindred::lora_dropout", mutates_args=())
def lora_dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """drop(x) for a 2-D x: kept elements scaled by 1 / (1 − p), the mask a counter hash of (seed, index)."""
    return _dropout(x, p, seed)


@lora_dropout.register_fake
def _(x, p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _dropout_into(src: torch.Tensor, p: float, seed: torch.Tensor, out: torch.Tensor) -> None:
    """out += drop(src) with the same mask (the A path's gradient through the dropout)."""
    _core.lora_dropout(view(src, "x"), p, view(seed, "seed"), view(out, "out"), True, stream(src))


def _dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _core.lora_dropout(view(x, "x"), p, view(seed, "seed"), view(out, "out"), False, stream(x))
    return out


def _dropped(x: torch.Tensor, p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """drop(x) for the plans, which run only as real kernels (inside an op or LoraLinearFunction): the core
    is called directly, without a second custom-op dispatch."""
    return x if p == 0.0 else _dropout(x, p, seed)


def forward_plan(x, fmt, base, param, a, b, bias, s, p, seed):
    """The CUDA forward as torch ops (runs on any device; tests run it on the CPU against the reference)."""
    k = x.shape[1]
    n, r = b.shape
    xs = torch.mm(_dropped(x, p, seed), a.t()).mul_(s)
    y = torch.mm(xs, b.t()) if bias is None else torch.addmm(bias, xs, b.t())
    y.addmm_(x, _weight(fmt, base, param, n, k, r, x).t())
    return y, xs


def backward_plan(dy, x, fmt, base, param, a, b, xs, s, p, seed):
    """The CUDA backward as torch ops: one GEMM dY·[W | s·B], dX += g·A in place (masked when p > 0)."""
    m, k = x.shape
    r = b.shape[1]
    wp = _workspace(fmt, base, param, b, s, k)
    full = x.new_empty_strided((m, k + r), (padded_width(k, r), 1))
    torch.mm(dy, wp, out=full)
    dx, g = full[:, :k], full[:, k:]
    xd = _dropped(x, p, seed)
    da = torch.mm(g.t(), xd)
    db = torch.mm(dy.t(), xs)
    if p == 0.0:
        dx.addmm_(g, a)
    else:
        _dropout_into(torch.mm(g, a), p, seed, dx)
    return dx, da, db


def _check_grad_dtype(dy: torch.Tensor, x: torch.Tensor) -> None:
    if dy.dtype != x.dtype:
        raise KindredValueError(f"the gradient of y has dtype {dy.dtype}, expected {x.dtype}")


class LoraLinearFunction(torch.autograd.Function):
    """kindred::lora_linear's autograd without the custom-op dispatch, for eager CUDA calls: the same plan,
    saved tensors, outputs (y, xs) and errors. apply(x, base, base_format, base_param, a, b, bias, scaling,
    dropout_p, seed) with the op's arguments (base a list of frozen tensors)."""

    @staticmethod
    def forward(ctx, x, base, base_format, base_param, a, b, bias, scaling, dropout_p, seed):
        y, xs = forward_plan(x, base_format, base, base_param, a, b, bias, scaling, dropout_p, seed)
        ctx.mark_non_differentiable(xs)
        ctx.set_materialize_grads(False)  # no zero gradient is built for xs (never differentiable)
        ctx.meta = (base_format, base_param, scaling, dropout_p)
        ctx.save_for_backward(x, a, b, xs, seed, *base)
        return y, xs

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dxs):
        base_format, base_param, scaling, dropout_p = ctx.meta
        x, a, b, xs, seed, *base = ctx.saved_tensors
        _check_grad_dtype(dy, x)
        dx, da, db = backward_plan(
            dy.contiguous(), x, base_format, base, base_param, a, b, xs, scaling, dropout_p, seed
        )
        return dx, None, None, None, da, db, None, None, None, None


def _dx_cuda_view(m: int, k: int, r: int, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(m, padded_width(k, r))[:, :k]


@torch.library.custom_op("kindred::lora_linear", mutates_args=())
def lora_linear(
    x: torch.Tensor,
    base: list[torch.Tensor],
    base_format: str,
    base_param: int,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N], xs [M, r]) for a 2-D x [M, K]; the module docstring has the formats and the CUDA plan."""
    m, k = x.shape
    n, r = b.shape
    if x.is_cuda:
        return forward_plan(x, base_format, base, base_param, a, b, bias, scaling, dropout_p, seed)
    w = dense_base(base_format, base, base_param, n, k, x.dtype)
    y = x.new_empty(m, n)
    xs = x.new_empty(m, r)
    _core.lora_linear(
        view(x, "x"),
        view(w, "base"),
        view(a, "A"),
        view(b, "B"),
        opt_view(bias, "bias"),
        scaling,
        dropout_p,
        opt_view(seed, "seed"),
        view(y),
        view(xs),
    )
    return y, xs


@lora_linear.register_fake
def _(x, base, base_format, base_param, a, b, bias, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], b.shape[0]), x.new_empty(x.shape[0], b.shape[1])


@torch.library.custom_op("kindred::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    base: list[torch.Tensor],
    base_format: str,
    base_param: int,
    a: torch.Tensor,
    b: torch.Tensor,
    xs: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [M, K], da [r, K], db [N, r]) of lora_linear for dy [M, N]. On CUDA dx is the first K columns of
    the [M, K + r] result of dY·W' (row stride padded_width(K, r)); on the CPU it is contiguous."""
    m, k = x.shape
    n, r = b.shape
    if x.is_cuda:
        return backward_plan(dy, x, base_format, base, base_param, a, b, xs, scaling, dropout_p, seed)
    w = dense_base(base_format, base, base_param, n, k, x.dtype)
    dx, da, db = x.new_empty(m, k), a.new_empty(r, k), b.new_empty(n, r)
    _core.lora_linear_backward(
        view(dy, "dy"),
        view(x, "x"),
        view(w, "base"),
        view(a, "A"),
        view(b, "B"),
        scaling,
        dropout_p,
        opt_view(seed, "seed"),
        view(dx),
        view(da),
        view(db),
    )
    return dx, da, db


@lora_linear_backward.register_fake
def _(dy, x, base, base_format, base_param, a, b, xs, scaling, dropout_p, seed):
    m, k = x.shape
    dx = _dx_cuda_view(m, k, b.shape[1], x) if x.is_cuda else x.new_empty(m, k)
    return dx, a.new_empty(a.shape), b.new_empty(b.shape)


def _setup_context(ctx, inputs, output):
    x, base, base_format, base_param, a, b, _bias, scaling, dropout_p, seed = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.meta = (base_format, base_param, scaling, dropout_p, len(base))
    ctx.save_for_backward(x, a, b, output[1], seed, *base)


def _backward(ctx, dy, _dxs):
    base_format, base_param, scaling, dropout_p, nbase = ctx.meta
    x, a, b, xs, seed, *base = ctx.saved_tensors
    _check_grad_dtype(dy, x)
    dx, da, db = lora_linear_backward(
        dy.contiguous(), x, base, base_format, base_param, a, b, xs, scaling, dropout_p, seed
    )
    return dx, [None] * nbase, None, None, da, db, None, None, None, None


lora_linear.register_autograd(_backward, setup_context=_setup_context)
