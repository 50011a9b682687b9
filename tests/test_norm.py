"""The norm family (rms_norm and its backward) on the CPU: against a float64 reference and the torch
expressions it replaces in models/decoder.py (forward and autograd), gradcheck, strided rows, poisoned
outputs, NaN, checkpointing and named errors. CUDA: tests/test_norm_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kindred import _core
from kindred._ops.adapter import rows, view
from kindred._ops.norm import rms_norm, rms_norm_backward, rms_norm_forward
from kindred.errors import KindredValueError

from .tolerances import REL_ERR, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6


def rand(*shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) + 0.1).to(dtype).to(device)


def ulp_close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """Equal but for a reduction's order and the rsqrt's last bit: one unit in the last place of a 16-bit
    dtype (64 of float32's: a sum of thousands of squares in another order moves by tens), relative to
    |want| or, for a gradient, at least ``scale`` (its row's largest term: dx = r·(gw − x̂·mean(x̂·gw))
    cancels them)."""
    assert not torch.isnan(got).any()
    eps = torch.finfo(got.dtype).eps * (64 if got.dtype == torch.float32 else 1)
    mag = want.double().abs() if scale is None else torch.maximum(want.double().abs(), scale)
    assert ((got.double() - want.double()).abs() <= mag * eps + torch.finfo(got.dtype).tiny).all()


# --- float64 references -----------------------------------------------------------------------------


def ref_rstd(x, eps=EPS):
    x = x.double()
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def ref_forward(x, w, offset, eps=EPS):
    return x.double() * ref_rstd(x, eps) * (offset + w.double())


def ref_grads(dout, x, w, offset, eps=EPS):
    """(dx, dw) of ref_forward by float64 autograd."""
    x64, w64 = (t.detach().to(torch.float64, copy=True).requires_grad_() for t in (x, w))
    ref_forward(x64, w64, offset, eps).backward(dout.double())
    return x64.grad, w64.grad


def grad_scale(dout, x, w, offset, eps=EPS):
    """Each row's largest term r·|dout·(offset + w)| of dx, which cancels them (D = 1: to eps/(x² + eps))."""
    return (ref_rstd(x, eps) * dout.double() * (offset + w.double())).abs().amax(-1, keepdim=True)


def grad_err(got, want, scale):
    """‖got − want‖ / ‖scale‖ (scale broadcast over the row)."""
    assert not torch.isnan(got).any()
    return float((got.detach().double() - want).norm() / scale.expand_as(want).norm())


# --- the torch expressions it replaces (models/decoder.py's RMSNorm) -----------------------------------


def torch_norm(x, w, offset, eps=EPS):
    d = (x.shape[-1],)
    if offset:
        return F.rms_norm(x.float(), d, 1.0 + w.float(), eps).type_as(x)
    return F.rms_norm(x, d, w, eps)


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("w_f32", [False, True], ids=["w_T", "w_f32"])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("d", [1, 64, 80, 1000, 4099])
@pytest.mark.parametrize("m", [1, 3, 117])
def test_rms_norm_against_float64(m, d, dtype, w_f32, offset):
    x, dout = rand(m, d, dtype=dtype, seed=1), rand(m, d, dtype=dtype, seed=2)
    w = rand(d, dtype=torch.float32 if w_f32 else dtype, seed=3).requires_grad_()
    xg = x.clone().requires_grad_()
    out = rms_norm(xg, w, EPS, offset)
    assert out.dtype == dtype and out.shape == (m, d)
    tol = REL_ERR.get(dtype, 1e-12)
    ref = ref_forward(x, w.detach(), offset)
    assert rel_err(out, ref) < tol
    _, rstd = rms_norm_forward(x, w.detach(), EPS, offset)
    assert rstd.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(rstd.double(), ref_rstd(x)[:, 0], rtol=REL_ERR.get(rstd.dtype, 1e-12), atol=0)
    out.backward(dout)
    want_dx, want_dw = ref_grads(dout, x, w.detach(), offset)
    assert xg.grad.dtype == dtype and w.grad.dtype == w.dtype
    assert grad_err(xg.grad, want_dx, grad_scale(dout, x, w.detach(), offset)) < tol
    assert rel_err(w.grad, want_dw) < REL_ERR.get(w.dtype, 1e-12)  # rounded to w's dtype


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,d", [(1, 1), (3, 64), (117, 80), (3, 1000), (117, 4099)])
def test_rms_norm_equals_the_torch_expressions_it_replaces(m, d, dtype, offset):
    """Forward within one ulp of the torch expression; dx within one ulp of each row's largest gradient term
    of torch's autograd (both in float, reductions reordered); Gemma's with w in T or float32."""
    x, dout = rand(m, d, dtype=dtype, seed=4), rand(m, d, dtype=dtype, seed=5)
    ws = [rand(d, dtype=dtype, seed=6)]
    if offset:
        ws.append(ws[0].float())  # Gemma's float32 expression reads w as float32 either way
    for w in ws:
        got_x, want_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = rms_norm(got_x, w, EPS, offset)
        want = torch_norm(want_x, w, offset)
        ulp_close(got, want)
        got.backward(dout)
        want.backward(dout)
        ulp_close(got_x.grad, want_x.grad, grad_scale(dout, x, w, offset))


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_gradcheck_float64(offset):
    x = rand(2, 3, 7, dtype=torch.float64, seed=7).requires_grad_()
    w = rand(7, dtype=torch.float64, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5, offset), (x, w))
    frozen = w.detach()  # dx alone (the LoRA case): no weight gradient is built
    assert torch.autograd.gradcheck(lambda x: rms_norm(x, frozen, 1e-5, offset), (x,))


def test_rms_norm_keeps_leading_dims_and_takes_zero_rows():
    x, w = rand(2, 5, 64, seed=9), rand(64, seed=10)
    assert torch.equal(rms_norm(x, w, EPS), rms_norm(x.view(10, 64), w, EPS).view(2, 5, 64))
    empty = rms_norm(torch.empty(0, 3, 64), w, EPS)
    assert empty.shape == (0, 3, 64)


def test_rms_norm_takes_strided_rows_and_writes_every_output():
    wide, dwide = rand(5, 300, seed=11), rand(5, 300, seed=12)
    x, dout, w = wide[:, 7:263], dwide[:, 20:276], rand(256, seed=13)
    assert rows(x).data_ptr() == x.data_ptr()  # a column range is read in place, not copied
    out, rstd = torch.full((5, 256), float("nan")), torch.full((5,), float("nan"))
    _core.rms_norm(view(x), view(w), EPS, 1.0, view(out), view(rstd), 0)
    want, want_rstd = rms_norm_forward(x.contiguous(), w, EPS, 1.0)
    assert torch.equal(out, want) and torch.equal(rstd, want_rstd)
    dx = torch.full((5, 256), float("nan"))
    _core.rms_norm_backward(view(dout), view(x), view(w), view(rstd), 1.0, view(dx), 0)
    assert torch.equal(dx, rms_norm_backward(dout.contiguous(), x.contiguous(), w, rstd, 1.0))
    xt = rand(256, 5, seed=14).t()  # unit row stride: copied to rows first
    assert torch.equal(rms_norm(xt, w, EPS), rms_norm(xt.contiguous(), w, EPS))


def test_rms_norm_propagates_nan():
    x, w = rand(4, 80, seed=15), rand(80, seed=16)
    x[1, 5] = float("nan")
    xg = x.clone().requires_grad_()
    out = rms_norm(xg, w, EPS)
    out.backward(torch.ones_like(out))
    for t in (out, xg.grad):
        assert torch.isnan(t[1]).all()
        assert not torch.isnan(t[[0, 2, 3]]).any()


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_under_checkpoint_equals_without(offset):
    x, w = rand(3, 4, 80, dtype=torch.bfloat16, seed=17), rand(80, dtype=torch.bfloat16, seed=18)
    dout = rand(3, 4, 80, dtype=torch.bfloat16, seed=19)

    def block(x, w):
        return rms_norm(x * 2, w, EPS, offset).sin()

    grads = []
    for ckpt in (False, True):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = checkpoint(block, xg, wg, use_reentrant=False) if ckpt else block(xg, wg)
        y.backward(dout)
        grads.append((y.detach(), xg.grad, wg.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def fake_cuda(t: torch.Tensor) -> _core.TensorView:
    """A view that claims to be on cuda:0 (never read: validation refuses it first)."""
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[t.dtype]
    return _core.TensorView(t.data_ptr(), dtype, list(t.shape), list(t.stride()), "cuda", 0)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=torch.ones(2, 8, dtype=torch.int32)), "x must be float32 or float64 or float16 or bfloat16"),
        (dict(x=torch.ones(16)), r"x must be 2-D \[rows, features\]"),
        (dict(x=torch.ones(2, 16)[:, ::2]), r"x must be \[2, 8\] with unit column stride"),
        (dict(w=torch.ones(8, dtype=torch.bfloat16)), "w must be float32, got bfloat16"),
        (
            dict(x=torch.ones(2, 8, dtype=torch.float16), w=torch.ones(8, dtype=torch.bfloat16)),
            "w must be float16 or float32, got bfloat16",
        ),
        (dict(w=torch.ones(7)), r"w must have shape \[8\]"),
        (dict(w=fake_cuda(torch.ones(8))), "w and x must be on the same device"),
        (dict(out=torch.empty(2, 8, dtype=torch.float16)), "out must have x's dtype float32"),
        (dict(out=torch.empty(8, 2)), r"out must have shape \[2, 8\]"),
        (dict(rstd=torch.empty(2, dtype=torch.float64)), "rstd must be float32"),
        (dict(rstd=torch.empty(3)), r"rstd must have shape \[2\]"),
        (dict(eps=0.0), "eps must be finite and > 0"),
        (dict(eps=float("inf")), "eps must be finite and > 0"),
        (dict(offset=2.0), "offset must be 0 .* or 1"),
    ],
)
def test_rms_norm_errors_name_the_argument(change, match):
    args = dict(
        x=torch.ones(2, 8), w=torch.ones(8), eps=EPS, offset=0.0, out=torch.empty(2, 8), rstd=torch.empty(2)
    )
    args.update(change)
    v = {k: a if isinstance(a, (float, _core.TensorView)) else view(a) for k, a in args.items()}
    with pytest.raises(KindredValueError, match=match):
        _core.rms_norm(v["x"], v["w"], v["eps"], v["offset"], v["out"], v["rstd"], 0)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(dout=torch.ones(2, 8, dtype=torch.bfloat16)), "dout must have x's dtype float32"),
        (dict(dout=torch.ones(3, 8)), r"dout must be \[2, 8\]"),
        (dict(w=torch.ones(7)), r"w must have shape \[8\]"),
        (dict(rstd=torch.ones(2, dtype=torch.bfloat16)), "rstd must be float32"),
        (dict(dx=torch.empty(2, 16)[:, :8]), "dx must be contiguous"),
        (dict(offset=-1.0), "offset must be 0 .* or 1"),
    ],
)
def test_rms_norm_backward_errors_name_the_argument(change, match):
    args = dict(
        dout=torch.ones(2, 8),
        x=torch.ones(2, 8),
        w=torch.ones(8),
        rstd=torch.ones(2),
        offset=0.0,
        dx=torch.empty(2, 8),
    )
    args.update(change)
    v = {k: a if isinstance(a, float) else view(a) for k, a in args.items()}
    with pytest.raises(KindredValueError, match=match):
        _core.rms_norm_backward(v["dout"], v["x"], v["w"], v["rstd"], v["offset"], v["dx"], 0)
