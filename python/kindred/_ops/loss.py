"""Custom ops of the loss family: ``kindred::linear_cross_entropy`` and its backward.

Two implementations behind one op:
- ``reference`` (CPU): the C++ reference over tiles of tokens × vocabulary (csrc/cpu/loss_cpu.cpp).
- ``chunked`` (CUDA; also runs on the CPU for tests): per token block × vocabulary chunk, GEMMs through torch
  (cuBLAS on CUDA, fp32 accumulation and fp32 logits) and the row-wise ``lce_*`` kernels in between
  (kernels/loss/loss_cuda.cu). No host synchronization: the count of non-ignored tokens stays a device tensor.

Chunked algorithm, per token block of T rows:
- single pass (frozen weight and bias, hidden needs grad, reduction mean/sum; as flash attention): per
  chunk ``L = H·W_cᵀ`` (fp32), ``lce_chunk_update`` (online max/sum, target, argmax, and
  E = e^{z − ref}·dz/dr written in place over L in the input dtype), ``A += E·W_c`` (fp32);
  ``lce_finalize`` turns A into dH. 2 GEMMs per chunk.
- two passes otherwise: the forward runs ``L``, ``lce_chunk_update`` (stats only); the backward recomputes
  ``L``, ``lce_chunk_grad`` writes G = coef·∂loss/∂r in place, then ``dH += G·W_c`` (fp32 accumulator) and
  ``dW_c += Gᵀ·H`` (in the weight's dtype; fp32 inside each GEMM) and ``dbias_c += Σ G`` (fp32).

Ignored tokens: their GEMM rows are computed and discarded (loss, gradient 0), unless the caller lists the
rows that may count (``rows``, from host-side data such as a trainer's packed batch; every other row must be
ignored): the token blocks then gather only those rows, so the dropped ones cost no FLOP and no host sync.
"""

from __future__ import annotations

import functools
import math

import torch

from .. import _core
from ..errors import KindredValueError
from .adapter import opt_view, stream, view

REDUCTIONS = ("none", "sum", "mean")
_STATE = _core.LCE_STATE
_MiB = 1 << 20
# Extra-memory budget of the chunked path (at (N, D, V) = (16384, 4096, 262144): single pass T = 1024,
# C = 8192: logits 32 MiB + dH accumulator 16 MiB; two passes T = 1536, C = 5376: 31.5 MiB + 24 MiB; with
# gathered rows T = 1024 in both, + 8 MiB of rows; plus O(N) row buffers (≈ 0.3 MiB) and, with a bias, an
# fp32 dbias accumulator of V floats).
LOGITS_BYTES = 32 * _MiB  # fp32 logits chunk T × C, reused in place for exp-weights / gradients
ACC_BYTES = 24 * _MiB  # [T, D] buffers: the fp32 dH accumulator (and the gathered rows)
MAX_ROWS = {True: 1024, False: 1536}  # token block rows (single pass, two passes)


def plan(
    n: int, d: int, v: int, single: bool, block_rows: int = 0, chunk_cols: int = 0, gather_itemsize: int = 0
) -> tuple[int, int]:
    """Token block rows T and vocabulary chunk columns C of the chunked path (0: from the memory budget);
    ``gather_itemsize`` > 0: a [T, D] buffer of gathered rows (``rows``) with elements of that size."""
    per_row = (4 + gather_itemsize) * d
    t = block_rows or max(1, min(n, MAX_ROWS[single], max(128, ACC_BYTES // per_row // 128 * 128)))
    c = chunk_cols or min(v, max(128, LOGITS_BYTES // (4 * max(t, 1)) // 128 * 128))
    return t, c


def options(ignore_index: int, label_smoothing: float, z_loss: float, softcap: float) -> _core.LceOptions:
    return _core.LceOptions(ignore_index, label_smoothing, z_loss, softcap)


def loss_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


@functools.cache
def _has_out_dtype(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.mm / torch.addmm take out_dtype=float32 for ``dtype`` inputs (torch >= 2.8, CUDA)."""
    try:
        a = torch.zeros(1, 1, dtype=dtype, device=device_type)
        c = torch.zeros(1, 1, dtype=torch.float32, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32, out=c)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32) = a · b with fp32 accumulation, without a low-precision intermediate where torch allows."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    elif _has_out_dtype(a.device.type, a.dtype):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:  # fp32 copies of the operands (CPU, torch < 2.8): more memory, the same fp32 logits
        torch.mm(a.float(), b.float(), out=out)


def addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """acc (fp32) += alpha · a · b."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=alpha)
    elif _has_out_dtype(a.device.type, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, alpha=alpha, out=acc)
    else:
        acc.addmm_(a.float(), b.float(), alpha=alpha)


def _aliased(buf: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The fp32 [rows, cols] chunk in ``buf`` seen as ``dtype``, each row over its own fp32 row."""
    flat = buf[: rows * cols]
    if dtype == torch.float32:
        return flat.view(rows, cols)
    per = 4 // dtype.itemsize
    return flat.view(dtype).view(rows, cols * per)[:, :cols]


def _valid_scale(t32: torch.Tensor, ignore_index: int, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid-token mask and the device scale of each token's loss: 1/max(count, 1) (mean) or 1 (sum)."""
    valid = t32 != ignore_index
    if reduction == "mean":
        return valid, 1.0 / valid.sum().clamp(min=1).to(torch.float32).reshape(1)
    return valid, torch.ones(1, dtype=torch.float32, device=t32.device)


def reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """The reduced loss: mean over the valid tokens (0.0 when there are none), sum, or the rows."""
    if reduction == "none":
        return rows.clone()
    total = rows.sum()
    return total / valid.sum().clamp(min=1).to(total.dtype) if reduction == "mean" else total


def _pick_impl(hidden: torch.Tensor, impl: str) -> str:
    if impl == "auto":
        return "chunked" if hidden.is_cuda else "reference"
    if impl == "reference" and hidden.is_cuda:
        raise KindredValueError("impl='reference' runs on the CPU; CUDA tensors use impl='chunked'")
    if impl == "chunked" and hidden.dtype == torch.float64:
        raise KindredValueError("float64 inputs run on the CPU reference (impl='reference'), not 'chunked'")
    if impl not in ("reference", "chunked"):
        raise KindredValueError(f"impl must be 'auto', 'reference' or 'chunked', got {impl!r}")
    return impl


class _Blocks:
    """Token blocks of T rows: slices of hidden, or with ``rows`` (device int64 [M], increasing) the listed
    rows gathered into one [T, D] buffer, which then also stages each block's dH for the scatter back (the
    block's GEMMs are done by then). Positions r0 run over the M listed rows (all N without ``rows``)."""

    def __init__(self, hidden: torch.Tensor, rows: torch.Tensor | None, t: int):
        self.hidden, self.rows, self.t = hidden, rows, t
        self.m = hidden.shape[0] if rows is None else rows.shape[0]
        self.buf = None if rows is None else hidden.new_empty(min(t, self.m), hidden.shape[1])

    def compact(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, ...] at the listed rows."""
        return x if self.rows is None else x.index_select(0, self.rows)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """x [M] back to [N], 0 at the rows not listed (the values of an ignored token)."""
        if self.rows is None:
            return x
        return x.new_zeros(self.hidden.shape[0]).index_copy_(0, self.rows, x)

    def __iter__(self):
        for r0 in range(0, self.m, self.t):
            k = min(self.t, self.m - r0)
            if self.rows is None:
                yield r0, k, self.hidden[r0 : r0 + k]
            else:
                yield r0, k, torch.index_select(self.hidden, 0, self.rows[r0 : r0 + k], out=self.buf[:k])

    def d_hidden(self, n: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        """The [N, D] gradient: every row written by the blocks, or zeros where rows are not listed."""
        dev = self.hidden.device
        return (torch.empty if self.rows is None else torch.zeros)(n, d, dtype=dtype, device=dev)

    def dh_rows(self, d_hidden: torch.Tensor, r0: int, k: int) -> torch.Tensor:
        """Where block r0 writes its dH: d_hidden's rows, or the staging buffer (then ``scatter``)."""
        return d_hidden[r0 : r0 + k] if self.rows is None else self.buf[:k]

    def scatter(self, d_hidden: torch.Tensor, r0: int, k: int) -> None:
        if self.rows is not None:
            d_hidden.index_copy_(0, self.rows[r0 : r0 + k], self.buf[:k])


def _chunked_forward(hidden, weight, bias, t32, rows, opt, single, scale, eps, block_rows, chunk_cols):
    """Per-token loss, lse and hit (and, single pass, dH scaled by ``scale``) by token blocks × chunks."""
    n, d = hidden.shape
    v = weight.shape[0]
    dev, st_ = hidden.device, stream(hidden)
    m, gather = (n, 0) if rows is None else (rows.shape[0], hidden.dtype.itemsize)
    t, c = plan(m, d, v, single, block_rows, chunk_cols, gather)
    blocks = _Blocks(hidden, rows, t)
    rows_loss = torch.empty(m, dtype=torch.float32, device=dev)
    lse = torch.empty(m, dtype=torch.float32, device=dev)
    hit = torch.empty(m, dtype=torch.uint8, device=dev)
    d_hidden = blocks.d_hidden(n if single else 0, d, hidden.dtype)
    if m == 0:
        return blocks.expand(rows_loss), blocks.expand(lse), blocks.expand(hit), d_hidden
    y_all = blocks.compact(t32)
    state = torch.empty(t, _core.LCE_STATE_COLS, dtype=torch.float32, device=dev)
    argmax = torch.empty(t, dtype=torch.int32, device=dev)
    buf = torch.empty(t * c, dtype=torch.float32, device=dev)
    acc = torch.zeros(t, d, dtype=torch.float32, device=dev) if single else None
    wsum = torch.sum(weight, dim=0, dtype=torch.float32) if single and eps > 0 else None
    for r0, k, h_blk in blocks:
        y_blk, st = y_all[r0 : r0 + k], state[:k]
        st.fill_(-math.inf)
        st[:, _STATE["sum"]].zero_()
        st[:, _STATE["sum_z"]].zero_()
        st[:, _STATE["z_target"]].fill_(math.nan)
        am = argmax[:k].zero_()
        a = acc[:k] if single else None
        for c0 in range(0, v, c):
            cols = min(c, v - c0)
            w_c = weight[c0 : c0 + cols]
            logits = buf[: k * cols].view(k, cols)
            mm_f32(h_blk, w_c.t(), logits)
            e = _aliased(buf, k, cols, hidden.dtype) if single else None
            _core.lce_chunk_update(
                view(logits),
                None if bias is None else view(bias[c0 : c0 + cols], "bias"),
                view(y_blk),
                c0,
                v,
                opt,
                view(st),
                view(am),
                opt_view(e, "exp_out"),
                opt_view(a, "acc"),
                st_,
            )
            if single:
                addmm_f32(a, e, w_c)
        _core.lce_finalize(
            view(st),
            view(am),
            view(y_blk),
            v,
            opt,
            view(rows_loss[r0 : r0 + k]),
            view(lse[r0 : r0 + k]),
            view(hit[r0 : r0 + k]),
            opt_view(a, "acc"),
            opt_view(weight if single else None, "weight"),
            opt_view(wsum, "wsum"),
            opt_view(scale if single else None, "scale"),
            opt_view(blocks.dh_rows(d_hidden, r0, k) if single else None, "d_hidden"),
            st_,
        )
        if single:
            blocks.scatter(d_hidden, r0, k)
    return blocks.expand(rows_loss), blocks.expand(lse), blocks.expand(hit), d_hidden


def _chunked_backward(
    hidden, weight, bias, t32, rows, lse, coef, opt, needs, block_rows, chunk_cols, grad_scale
):
    """dH, dW, dbias (those in ``needs``) by recomputing the logits chunks from the saved lse.

    G is written as grad_scale·coef·∂loss/∂r (a power of two; float16 would flush small gradients to zero
    otherwise) and the GEMMs take alpha = 1 / grad_scale. dW accumulates over the token blocks in the weight's
    dtype (fp32 inside each GEMM); the first block writes it (beta = 0), so it needs no zero fill.
    """
    coef = coef * grad_scale if grad_scale != 1.0 else coef
    inv = 1.0 / grad_scale
    n, d = hidden.shape
    v = weight.shape[0]
    dev, st_ = hidden.device, stream(hidden)
    need_dh, need_dw, need_db = needs
    m, gather = (n, 0) if rows is None else (rows.shape[0], hidden.dtype.itemsize)
    t, c = plan(m, d, v, False, block_rows, chunk_cols, gather)
    blocks = _Blocks(hidden, rows, t)
    d_hidden = blocks.d_hidden(n if need_dh else 0, d, hidden.dtype)
    d_weight = (torch.empty if m > 0 else torch.zeros)(v if need_dw else 0, d, dtype=weight.dtype, device=dev)
    db_acc = torch.zeros(v if need_db else 0, dtype=torch.float32, device=dev)
    if m > 0 and any(needs):
        y_all, lse_all, coef_all = blocks.compact(t32), blocks.compact(lse), blocks.compact(coef)
        buf = torch.empty(t * c, dtype=torch.float32, device=dev)
        acc = torch.empty(t if need_dh else 0, d, dtype=torch.float32, device=dev)
        for r0, k, h_blk in blocks:
            a = acc[:k].zero_() if need_dh else None
            for c0 in range(0, v, c):
                cols = min(c, v - c0)
                w_c = weight[c0 : c0 + cols]
                logits = buf[: k * cols].view(k, cols)
                mm_f32(h_blk, w_c.t(), logits)
                g = _aliased(buf, k, cols, hidden.dtype)
                _core.lce_chunk_grad(
                    view(logits),
                    None if bias is None else view(bias[c0 : c0 + cols], "bias"),
                    view(y_all[r0 : r0 + k]),
                    c0,
                    v,
                    opt,
                    view(lse_all[r0 : r0 + k]),
                    view(coef_all[r0 : r0 + k]),
                    view(g, "grad_out"),
                    st_,
                )
                if need_dh:
                    addmm_f32(a, g, w_c, inv)
                if need_dw:
                    dw_c = d_weight[c0 : c0 + cols]
                    torch.addmm(dw_c, g.t(), h_blk, beta=0 if r0 == 0 else 1, alpha=inv, out=dw_c)
                if need_db:
                    db_acc[c0 : c0 + cols].add_(torch.sum(g, dim=0, dtype=torch.float32), alpha=inv)
            if need_dh:
                blocks.dh_rows(d_hidden, r0, k).copy_(a)
                blocks.scatter(d_hidden, r0, k)
    d_bias = db_acc.to(weight.dtype)
    return d_hidden, d_weight, d_bias


def _reference_forward(hidden, weight, bias, t32, opt):
    n = hidden.shape[0]
    ld = loss_dtype(hidden)
    rows_loss = torch.empty(n, dtype=ld)
    lse = torch.empty(n, dtype=ld)
    hit = torch.empty(n, dtype=torch.uint8)
    _core.linear_cross_entropy(
        view(hidden, "hidden"),
        view(weight, "weight"),
        opt_view(bias, "bias"),
        view(t32, "targets"),
        opt,
        view(rows_loss),
        view(lse),
        view(hit),
    )
    return rows_loss, lse, hit


def _reference_backward(hidden, weight, bias, t32, lse, coef, opt, needs):
    n, d = hidden.shape
    v = weight.shape[0]
    need_dh, need_dw, need_db = needs
    d_hidden = torch.empty(n if need_dh else 0, d, dtype=hidden.dtype)
    d_weight = torch.empty(v if need_dw else 0, d, dtype=weight.dtype)
    d_bias = torch.empty(v if need_db else 0, dtype=weight.dtype)
    coef = coef.to(lse.dtype).contiguous()  # held here: a TensorView keeps only the pointer
    _core.linear_cross_entropy_backward(
        view(hidden, "hidden"),
        view(weight, "weight"),
        opt_view(bias, "bias"),
        view(t32, "targets"),
        view(lse),
        view(coef),
        opt,
        view(d_hidden) if need_dh else None,
        view(d_weight) if need_dw else None,
        view(d_bias) if need_db else None,
    )
    return d_hidden, d_weight, d_bias


def _targets32(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """int32 targets for the core. An int64 target outside int32's range becomes an int32 outside [0, V) that
    is not ignore_index (so the CPU rejects it and CUDA gives NaN), never its low 32 bits: 2³² + 3 must not
    train as class 3."""
    if targets.dtype == torch.int64:
        info = torch.iinfo(torch.int32)
        wide = (targets < info.min) | (targets > info.max)
        out_of_range = info.min if ignore_index == info.max else info.max
        targets = torch.where(wide, out_of_range, targets)
    return targets.to(torch.int32).contiguous()


@torch.library.custom_op("kindred::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: str,
    single_pass: bool,
    impl: str,
    block_rows: int,
    chunk_cols: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-token loss, lse, hit, dH) of hidden [N, D] against weight [V, D] and targets [N].

    loss is a scalar (mean/sum) or [N] (none); dH ([N, D], empty unless ``single_pass``) is the gradient of
    the reduced loss wrt hidden, computed in the forward (the backward scales it by grad_output). ``rows``
    (int64 [M] on hidden's device, increasing, or None): the only rows whose target may differ from
    ignore_index; the chunked path skips the others (the reference computes every row).
    """
    opt = options(ignore_index, label_smoothing, z_loss, softcap)
    t32 = _targets32(targets, ignore_index)
    valid, scale = _valid_scale(t32, ignore_index, reduction)
    if _pick_impl(hidden, impl) == "reference":
        rows_loss, lse, hit = _reference_forward(hidden, weight, bias, t32, opt)
        if single_pass:
            coef = valid.to(lse.dtype) * scale.to(lse.dtype)
            d_hidden = _reference_backward(hidden, weight, bias, t32, lse, coef, opt, (True, False, False))[0]
        else:
            d_hidden = hidden.new_empty(0, hidden.shape[1])
    else:
        rows_loss, lse, hit, d_hidden = _chunked_forward(
            hidden, weight, bias, t32, rows, opt, single_pass, scale, label_smoothing, block_rows, chunk_cols
        )
    return reduce(rows_loss, valid, reduction), rows_loss, lse, hit.view(torch.bool), d_hidden


@linear_cross_entropy.register_fake
def _(hidden, weight, bias, targets, rows, ignore_index, eps, z_loss, softcap, reduction, single_pass, *_):
    n, d = hidden.shape
    ld = loss_dtype(hidden)
    loss = hidden.new_empty((n,) if reduction == "none" else (), dtype=ld)
    return (
        loss,
        hidden.new_empty(n, dtype=ld),
        hidden.new_empty(n, dtype=ld),
        hidden.new_empty(n, dtype=torch.bool),
        hidden.new_empty(n if single_pass else 0, d),
    )


@torch.library.custom_op("kindred::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: torch.Tensor | None,
    lse: torch.Tensor,
    coef: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    needs: list[bool],
    impl: str,
    block_rows: int,
    chunk_cols: int,
    grad_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dH, dW, dbias) for per-token loss weights ``coef`` [N]; those not in ``needs`` are empty."""
    opt = options(ignore_index, label_smoothing, z_loss, softcap)
    t32 = _targets32(targets, ignore_index)
    need = tuple(bool(x) for x in needs)
    if _pick_impl(hidden, impl) == "reference":
        return _reference_backward(hidden, weight, bias, t32, lse, coef, opt, need)
    coef32 = coef.to(torch.float32).contiguous()
    return _chunked_backward(
        hidden, weight, bias, t32, rows, lse, coef32, opt, need, block_rows, chunk_cols, grad_scale
    )


@linear_cross_entropy_backward.register_fake
def _(
    hidden, weight, bias, targets, rows, lse, coef, ignore_index, label_smoothing, z_loss, softcap, needs, *_
):
    n, d = hidden.shape
    v = weight.shape[0]
    return (
        hidden.new_empty(n if needs[0] else 0, d),
        weight.new_empty(v if needs[1] else 0, d),
        weight.new_empty(v if needs[2] else 0),
    )


_NO_GRADS = (None,) * 11  # targets, rows and the non-tensor arguments


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, rows, ignore_index, eps, lam, cap, reduction, single, impl, r, c = inputs
    _, _, lse, _, d_hidden = output
    # Only the loss is differentiated; the other outputs' gradients stay None instead of zeros (an unused
    # dH output would otherwise cost an [N, D] buffer of zeros in the backward).
    ctx.set_materialize_grads(False)
    # Eager: dH is kept off save_for_backward (no version check), so the first backward scales it in place and
    # returns it without a second [N, D] buffer. Traced (torch.compile; fake/functional tensors): saved.
    eager = type(d_hidden) is torch.Tensor
    ctx.save_for_backward(hidden, weight, bias, targets, rows, lse, None if eager else d_hidden)
    ctx.d_hidden = d_hidden.detach() if single and eager else None
    ctx.args = (ignore_index, eps, lam, cap, reduction, single, impl, r, c)


def _backward(ctx, g_loss, *_unused):
    if g_loss is None:  # the loss itself was not used
        return None, None, None, *_NO_GRADS
    hidden, weight, bias, targets, rows, lse, saved_dh = ctx.saved_tensors
    ignore_index, eps, lam, cap, reduction, single, impl, block_rows, chunk_cols = ctx.args
    if single and ctx.d_hidden is not None:
        # A second backward through the same graph (retain_graph) finds it consumed and recomputes it below.
        d_hidden, ctx.d_hidden = ctx.d_hidden, None
        return d_hidden.mul_(g_loss.to(d_hidden.dtype)), None, None, *_NO_GRADS
    if single and saved_dh is not None:
        return saved_dh * g_loss.to(saved_dh.dtype), None, None, *_NO_GRADS
    valid = targets != ignore_index
    if reduction == "none":
        coef = g_loss
    elif reduction == "mean":
        coef = (g_loss / valid.sum().clamp(min=1).to(g_loss.dtype)).expand(valid.shape)
    else:
        coef = g_loss.expand(valid.shape)
    coef = torch.where(valid, coef, torch.zeros_like(coef)).to(lse.dtype).contiguous()
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    # float16 G: the mean's 1/count would push most entries below fp16's normal range; scale by up to N
    # (a power of two ≤ 2^12, so |G| ≤ 2^13 even when one token counts).
    n = targets.shape[0]
    gscale = (
        float(2 ** min(12, max(n, 1).bit_length() - 1))
        if reduction == "mean" and hidden.dtype == torch.float16
        else 1.0
    )
    dh, dw, db = linear_cross_entropy_backward(
        hidden,
        weight,
        bias,
        targets,
        rows,
        lse,
        coef,
        ignore_index,
        eps,
        lam,
        cap,
        needs,
        impl,
        block_rows,
        chunk_cols,
        gscale,
    )
    return dh if needs[0] else None, dw if needs[1] else None, db if needs[2] else None, *_NO_GRADS


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)
