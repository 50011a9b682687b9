"""The fused family (add_rms_norm, silu_mul, rope_qk_cache; rope_rotate and silu_mul_backward behind the
training ops rope and swiglu): the CPU reference against float64 and the unfused torch ops (and their eager
autograd) it replaces, poisoned outputs, named errors; the autograd functions against gradcheck and under
checkpointing; the decode path through them (engine.fused) against the unfused one on every family that
allows it. CUDA and stacked_decode: tests/test_fused_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kindred import _core, models
from kindred._ops.adapter import view
from kindred._ops.fused import (
    add_rms_norm,
    rope,
    rope_qk_cache,
    rope_rotate,
    silu_mul,
    swiglu,
)
from kindred.errors import KindredValueError
from kindred.generate import SamplingConfig, generate
from kindred.generate.runner import Engine, Runner
from kindred.models.rope import apply_rotary

from .model_helpers import FAMILY_CONFIGS, MOE_CONFIGS, VOCAB, saved_hf_model
from .tolerances import REL_ERR, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rand(*shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) + 0.1).to(dtype).to(device)


def ulp_close(got: torch.Tensor, want: torch.Tensor, per_row: bool = False) -> None:
    """Equal but for a reduction's order and rsqrt's last bit: one unit in the last place of a 16-bit dtype,
    which rounds those away but at its midpoints; float32 keeps them: 64 of its units (a sum of 5,120 squares
    in another order moves the normalizer by tens). ``per_row``: units of each row's largest value (rotary's
    sums cancel: a last-bit change of a term is large next to them)."""
    assert not torch.isnan(got).any()
    eps = torch.finfo(got.dtype).eps * (64 if got.dtype == torch.float32 else 1)
    mag = want.double().abs()
    if per_row:
        mag = mag.amax(-1, keepdim=True)
    tol = mag * eps + torch.finfo(got.dtype).tiny
    assert ((got.double() - want.double()).abs() <= tol).all()


# --- the unfused torch ops each one replaces (as models/decoder.py composed them) ---------------------


def unfused_add_rms_norm(x, residual, w, eps):
    s = x + residual
    return F.rms_norm(s, (s.shape[-1],), w, eps), s


def unfused_rope(x, norm, eps, cos, sin):
    """x [B, H, D] -> normalized (when norm) and rotated, as Attention.forward does."""
    if norm is not None:
        x = F.rms_norm(x, (x.shape[-1],), norm, eps)
    return apply_rotary(x[:, None], cos[:, None], sin[:, None])[:, 0]


# --- float64 references (no intermediate rounding) -------------------------------------------------


def ref_rms(s, w, eps):
    s = s.double()
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def ref_rope(x, norm, eps, cos, sin):
    x = x.double() if norm is None else ref_rms(x, norm, eps)
    rot = cos.shape[-1]
    c, s = cos.double()[:, None], sin.double()[:, None]
    x1, x2 = x[..., : rot // 2], x[..., rot // 2 : rot]
    out = x[..., :rot] * c + torch.cat((-x2, x1), -1) * s
    return torch.cat((out, x[..., rot:]), -1)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("m,d", [(1, 64), (3, 1000), (117, 576), (2, 4099)])
def test_add_rms_norm_against_float64_and_the_unfused_ops(dtype, m, d):
    x, r, w = rand(m, d, dtype=dtype, seed=1), rand(m, d, dtype=dtype, seed=2), rand(d, dtype=dtype, seed=3)
    out, s = add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, x + r)  # the sum rounds once, as torch's add
    ref = ref_rms(x.double() + r.double(), w, 1e-6)
    assert rel_err(out, ref) < REL_ERR.get(dtype, 1e-12)
    if dtype != torch.float64:
        ulp_close(out, unfused_add_rms_norm(x, r, w, 1e-6)[0])


def test_add_rms_norm_takes_strided_rows_and_writes_every_output():
    wide = rand(5, 300, seed=4)
    x, r, w = wide[:, :256], rand(5, 256, seed=5), rand(256, seed=6)
    out, s = torch.full((5, 256), float("nan")), torch.full((5, 256), float("nan"))
    _core.add_rms_norm(view(x), view(r), view(w), 1e-5, view(out), view(s), 0)
    want, want_s = unfused_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, want_s)
    ulp_close(out, want)
    _core.add_rms_norm(view(x), view(r), view(w), 1e-5, view(out), view(r), 0)  # in place into the residual
    assert torch.equal(r, want_s)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("m,n", [(1, 1), (3, 130), (117, 384)])
def test_silu_mul_against_float64_and_the_unfused_ops(dtype, m, n):
    buf = rand(m, 2 * n + 3, dtype=dtype, seed=7)  # gate and up: column ranges of one buffer
    gate, up = buf[:, :n], buf[:, n + 3 :]
    out = silu_mul(gate, up)
    ref = F.silu(gate.double()) * up.double()
    assert rel_err(out, ref) < REL_ERR.get(dtype, 1e-12)
    if dtype != torch.float64:
        ulp_close(out, F.silu(gate) * up)
        if dtype != torch.float32:  # two roundings (silu, product), exactly as torch's two ops
            assert torch.equal(out, F.silu(gate) * up)


def rope_case(dtype, b, h, hkv, d, rot, norm, rows=None, cap=9):
    q, k, v = (
        rand(b, h * d, dtype=dtype, seed=8),
        rand(b, hkv * d, dtype=dtype, seed=9),
        rand(b, hkv * d, seed=10),
    )
    v = v.to(dtype)
    qn, kn = (rand(d, dtype=dtype, seed=11), rand(d, dtype=dtype, seed=12)) if norm else (None, None)
    ang = rand(b, rot // 2, seed=13) * 3
    cos = torch.cat((ang.cos(), ang.cos()), -1).to(dtype)
    sin = torch.cat((ang.sin(), ang.sin()), -1).to(dtype)
    rows = rows or b
    cache_k = torch.full((rows, hkv, cap, d), float("nan"), dtype=dtype)
    cache_v = torch.full((rows, hkv, cap, d), float("nan"), dtype=dtype)
    slots = torch.tensor([(3 * i + 2) % cap for i in range(b)], dtype=torch.int64)
    return q, k, v, qn, kn, cos, sin, cache_k, cache_v, slots


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize(
    "b,h,hkv,d,rot,norm",
    [(1, 4, 2, 64, 64, True), (3, 6, 3, 32, 16, False), (5, 8, 1, 128, 128, True), (2, 2, 2, 10, 6, True)],
)
def test_rope_qk_cache_against_float64_and_the_unfused_ops(dtype, b, h, hkv, d, rot, norm):
    q, k, v, qn, kn, cos, sin, cache_k, cache_v, slots = rope_case(dtype, b, h, hkv, d, rot, norm, rows=b + 2)
    q_out = rope_qk_cache(q, k, v, qn, kn, 1e-6, cos, sin, cache_k, cache_v, slots)
    assert q_out.shape == (b, h, d)
    tol = REL_ERR.get(dtype, 1e-12)
    assert rel_err(q_out, ref_rope(q.view(b, h, d), qn, 1e-6, cos, sin)) < tol
    rows = torch.arange(b)
    k_written, v_written = cache_k[rows, :, slots], cache_v[rows, :, slots]  # [B, Hkv, D]
    assert rel_err(k_written, ref_rope(k.view(b, hkv, d), kn, 1e-6, cos, sin)) < tol
    assert torch.equal(v_written, v.view(b, hkv, d))
    if dtype != torch.float64:
        ulp_close(q_out, unfused_rope(q.view(b, h, d), qn, 1e-6, cos, sin), per_row=True)
        ulp_close(k_written, unfused_rope(k.view(b, hkv, d), kn, 1e-6, cos, sin), per_row=True)
        if not norm:  # rotary alone rounds as the unfused ops do: bit for bit
            assert torch.equal(q_out, unfused_rope(q.view(b, h, d), None, 0, cos, sin))
    written = torch.zeros(cache_k.shape[:3], dtype=torch.bool)
    written[rows, :, slots] = True
    assert (
        torch.isnan(cache_k[~written]).all() and torch.isnan(cache_v[~written]).all()
    )  # nothing else touched


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(w=torch.ones(7)), r"w must have shape \[8\]"),
        (dict(x=torch.ones(2, 8, dtype=torch.bfloat16)), "residual must have x's dtype"),
        (dict(eps=0.0), "eps must be finite and > 0"),
        (dict(x=torch.ones(2, 16)[:, ::2]), r"x must be \[2, 8\] with unit column stride"),
    ],
)
def test_add_rms_norm_errors_name_the_argument(change, match):
    args = dict(x=torch.ones(2, 8), residual=torch.ones(2, 8), w=torch.ones(8), eps=1e-6)
    args.update(change)
    x = args["x"]
    with pytest.raises(KindredValueError, match=match):
        _core.add_rms_norm(
            view(x), view(args["residual"]), view(args["w"]), args["eps"], view(torch.empty(2, 8)),
            view(torch.empty(2, 8)), 0,
        )  # fmt: skip


def test_rope_qk_cache_errors_name_the_argument():
    q, k, v, qn, kn, cos, sin, cache_k, cache_v, slots = rope_case(torch.float32, 2, 4, 2, 16, 16, True)
    with pytest.raises(KindredValueError, match="q_norm and k_norm must be given together"):
        rope_qk_cache(q, k, v, qn, None, 1e-6, cos, sin, cache_k, cache_v, slots)
    with pytest.raises(KindredValueError, match="must be a multiple of the cache's 2 kv heads"):
        rope_qk_cache(q[:, :48], k, v, qn, kn, 1e-6, cos, sin, cache_k, cache_v, slots)
    with pytest.raises(KindredValueError, match=r"cos must be \[2, rot\] with rot even"):
        rope_qk_cache(q, k, v, qn, kn, 1e-6, cos[:, :5], sin[:, :5], cache_k, cache_v, slots)
    with pytest.raises(KindredValueError, match="slots must be int64"):
        rope_qk_cache(q, k, v, qn, kn, 1e-6, cos, sin, cache_k, cache_v, slots.int())
    with pytest.raises(KindredValueError, match=r"slots\[1\] = 9 is outside the cache's capacity 9"):
        rope_qk_cache(q, k, v, qn, kn, 1e-6, cos, sin, cache_k, cache_v, torch.tensor([0, 9]))
    assert torch.isnan(cache_k).all()  # a refused call writes nothing


# --- rope_rotate and silu_mul_backward: the training steps, forward and backward ----------------------


def ref_rope_inverse(y, cos, sin):
    """The transpose of ref_rope's rotary (no norm) in float64: what autograd sends back to x from dy = y."""
    y, c, s = y.double(), cos.double()[:, None], sin.double()[:, None]
    rot = cos.shape[-1]
    half = rot // 2
    y1, y2 = y[..., :half], y[..., half:rot]
    lo = y1 * c[..., :half] + y2 * s[..., half:]
    hi = y2 * c[..., half:] - y1 * s[..., :half]
    return torch.cat((lo, hi, y[..., rot:]), -1)


def rotary_tables(rows, rot, dtype, seed=13, rotation=True):
    """cos, sin [rows, rot] in the rotate-half layout (both halves alike), or (not rotation) two unrelated
    random tables: the ops are linear maps for any tables, and only unlike halves catch a sin read from the
    wrong half."""
    if not rotation:
        return rand(rows, rot, dtype=dtype, seed=seed), rand(rows, rot, dtype=dtype, seed=seed + 1)
    ang = rand(rows, rot // 2, seed=seed) * 3
    return torch.cat((ang.cos(), ang.cos()), -1).to(dtype), torch.cat((ang.sin(), ang.sin()), -1).to(dtype)


def head_input(rows, heads, d, dtype, layout, seed=20):
    """x [rows, heads, D] contiguous, as a column chunk of a wider projection output (row stride 2·H·D + 8),
    or with padded heads (head stride D + 8)."""
    if layout == "contiguous":
        return rand(rows, heads, d, dtype=dtype, seed=seed)
    if layout == "chunk":
        return rand(rows, 2 * heads * d + 8, dtype=dtype, seed=seed)[:, heads * d : 2 * heads * d].unflatten(
            1, (heads, d)
        )
    return rand(rows, heads, d + 8, dtype=dtype, seed=seed)[..., :d]


def eager_rotary(x, cos, sin):
    """apply_rotary on [rows, heads, D] (as one batch of rows tokens) and its eager gradient for dy."""
    return apply_rotary(x[None], cos[None], sin[None])[0]


def eager_rotary_grad(x, cos, sin, dy):
    xr = x.detach().clone().requires_grad_()
    (dx,) = torch.autograd.grad(eager_rotary(xr, cos, sin), xr, dy)
    return dx


def call_rope_rotate(x, cos, sin, inverse):
    """_core.rope_rotate into a NaN-poisoned output: every element must be written."""
    out = torch.full(x.shape, float("nan"), dtype=x.dtype)
    _core.rope_rotate(view(x), view(cos), view(sin), inverse, view(out), 0)
    return out


ROPE_SHAPES = [
    (1, 1, 64, 64),
    (3, 3, 80, 80),
    (117, 8, 128, 96),
    (3, 8, 256, 256),
    (117, 3, 80, 64),
    (5, 2, 64, 2),
    (2, 3, 10, 6),
]


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("rows,heads,d,rot", ROPE_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "chunk", "padded_heads"])
@pytest.mark.parametrize("rotation", [True, False])
def test_rope_rotate_against_float64_and_eager_autograd(dtype, rows, heads, d, rot, layout, rotation):
    x = head_input(rows, heads, d, dtype, layout)
    dy = rand(rows, heads, d, dtype=dtype, seed=21)
    cos, sin = rotary_tables(rows, rot, dtype, rotation=rotation)
    tol = REL_ERR.get(dtype, 1e-12)
    y = call_rope_rotate(x, cos, sin, False)
    assert rel_err(y, ref_rope(x, None, 0, cos, sin)) < tol
    assert torch.equal(y, eager_rotary(x, cos, sin))  # the same roundings as torch's mul, neg, cat, add
    dx = call_rope_rotate(dy, cos, sin, True)
    assert rel_err(dx, ref_rope_inverse(dy, cos, sin)) < tol
    assert torch.equal(dx, eager_rotary_grad(x, cos, sin, dy))


@pytest.mark.parametrize("rows,heads,d,rot", [(7, 3, 80, 64), (4, 2, 10, 10)])
def test_rope_rotate_inverse_is_the_transpose(rows, heads, d, rot):
    """<R·x, y> = <x, Rᵀ·y> in float64 for general tables (no cos² + sin² = 1 to hide a wrong sin index)."""
    x, y = (
        rand(rows, heads, d, dtype=torch.float64, seed=1),
        rand(rows, heads, d, dtype=torch.float64, seed=2),
    )
    cos, sin = rotary_tables(rows, rot, torch.float64, rotation=False)
    lhs = (rope_rotate(x, cos, sin) * y).sum()
    rhs = (x * rope_rotate(y, cos, sin, inverse=True)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=0)


def silu_grads64(dout, gate, up):
    """(dgate, dup) of silu(gate) · up in float64."""
    d, g, u = dout.double(), gate.double(), up.double()
    sig = torch.sigmoid(g)
    return d * u * sig * (1 + g * (1 - sig)), d * F.silu(g)


def eager_silu_grads(dout, gate, up):
    g, u = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    return torch.autograd.grad(F.silu(g) * u, (g, u), dout)


def assert_silu_grads_close(got, want, dout, gate, up):
    """Equal but for exp's last bit: torch's CPU silu and silu_backward take exp from Sleef's vectorized
    expf / exp (within 1 ulp), not from libm as the reference does; dgate's error is relative to the size of
    its terms (ds · σ · (1 + |g| · (1 − σ))), not to dgate, which cancels near g = −1.28."""
    d, g, u = dout.double(), gate.double(), up.double()
    sig = torch.sigmoid(g)
    eps, tiny = torch.finfo(gate.dtype).eps, torch.finfo(gate.dtype).tiny
    scales = ((d * u).abs() * sig * (1 + g.abs() * (1 - sig)), (d * F.silu(g)).abs())
    for a, b, scale in zip(got, want, scales, strict=True):
        assert not torch.isnan(a).any()
        assert ((a.double() - b.double()).abs() <= 4 * eps * scale + tiny).all()


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("m,n", [(1, 1), (3, 130), (117, 384)])
def test_silu_mul_backward_against_float64_and_eager_autograd(dtype, m, n):
    buf = rand(m, 2 * n + 3, dtype=dtype, seed=7)  # gate and up: column ranges of one buffer
    gate, up = buf[:, :n], buf[:, n + 3 :]
    dout = rand(m, n + 5, dtype=dtype, seed=8)[:, 2 : n + 2]
    dgate, dup = torch.full((m, n), float("nan"), dtype=dtype), torch.full((m, n), float("nan"), dtype=dtype)
    _core.silu_mul_backward(view(dout), view(gate), view(up), view(dgate), view(dup), 0)
    tol = REL_ERR.get(dtype, 1e-12)
    for got, ref in zip((dgate, dup), silu_grads64(dout, gate, up), strict=True):
        assert rel_err(got, ref) < tol
    eager = eager_silu_grads(dout, gate, up)
    if dtype == torch.bfloat16:  # exp's last bit never reaches a bfloat16 result here
        assert torch.equal(dgate, eager[0]) and torch.equal(dup, eager[1])
    else:
        assert_silu_grads_close((dgate, dup), eager, dout, gate, up)


# --- the autograd functions the training forward calls -----------------------------------------------


def rope_inputs(b, t, h, d, rot, dtype, table_batch, seed=30):
    x = rand(b, t, h, d, dtype=dtype, seed=seed)
    cos, sin = rotary_tables(table_batch * t, rot, dtype, seed=seed + 1)
    return x, cos.view(table_batch, t, rot), sin.view(table_batch, t, rot)


def test_rope_and_swiglu_pass_gradcheck():
    x, cos, sin = rope_inputs(2, 5, 3, 8, 6, torch.float64, 1)
    assert torch.autograd.gradcheck(rope, (x.requires_grad_(), cos, sin))
    x, cos, sin = rope_inputs(2, 4, 2, 10, 10, torch.float64, 2)
    assert torch.autograd.gradcheck(rope, (x.requires_grad_(), cos, sin))
    buf = rand(2, 3, 17, dtype=torch.float64, seed=3)
    gate, up = buf[..., :7].clone().requires_grad_(), buf[..., 9:16].clone().requires_grad_()
    assert torch.autograd.gradcheck(swiglu, (gate, up))


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("table_batch", [1, 2])
def test_rope_equals_eager_apply_rotary_and_its_gradient(dtype, table_batch):
    x, cos, sin = rope_inputs(2, 9, 3, 80, 64, dtype, table_batch)
    # x as q out of a [B, T, (H + 2·Hkv)·D] projection: strided rows, no copy needed
    wide = torch.cat((x.flatten(2), rand(2, 9, 160, dtype=dtype, seed=4)), -1)
    q = wide[..., : 3 * 80].unflatten(-1, (3, 80))
    dy = rand(2, 9, 3, 80, dtype=dtype, seed=5)
    got, want = [], []
    for fn, out in ((rope, got), (apply_rotary, want)):
        leaf = wide.detach().clone().requires_grad_()
        xq = leaf[..., : 3 * 80].unflatten(-1, (3, 80))
        y = fn(xq, cos, sin)
        (dx,) = torch.autograd.grad(y, leaf, dy)
        out += [y, dx]
    assert got[0].shape == q.shape
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_equals_eager_silu_mul_and_its_gradient(dtype):
    buf = rand(2, 5, 2 * 96, dtype=dtype, seed=9)  # gate and up: the halves of one fused projection
    dout = rand(2, 5, 96, dtype=dtype, seed=10)
    got, want = [], []
    for fn, out in ((swiglu, got), (lambda g, u: F.silu(g) * u, want)):
        leaf = buf.detach().clone().requires_grad_()
        y = fn(leaf[..., :96], leaf[..., 96:])
        (d,) = torch.autograd.grad(y, leaf, dout)
        out += [y, d[..., :96], d[..., 96:]]
    assert got[0].shape == (2, 5, 96)
    if dtype == torch.bfloat16:
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    else:
        ulp_close(got[0], want[0])
        assert_silu_grads_close(got[1:], want[1:], dout, buf[..., :96], buf[..., 96:])


def test_rope_and_swiglu_under_checkpointing_give_the_same_gradients():
    x, cos, sin = rope_inputs(2, 6, 4, 16, 12, torch.float32, 1)
    up = rand(2, 6, 4 * 16, seed=11)
    dy = rand(2, 6, 4 * 16, seed=12)

    def block(x, up):
        return swiglu(rope(x, cos, sin).flatten(2), up)

    grads = []
    for ckpt in (False, True):
        xg, ug = x.clone().requires_grad_(), up.clone().requires_grad_()
        y = checkpoint(block, xg, ug, use_reentrant=False) if ckpt else block(xg, ug)
        y.backward(dy)
        assert xg.grad.shape == x.shape and ug.grad.shape == up.shape
        grads.append((y.detach(), xg.grad, ug.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


# --- errors -------------------------------------------------------------------------------------------


def fake_cuda(t: torch.Tensor) -> _core.TensorView:
    """A view that claims to be on cuda:0 (never read: validation refuses it first)."""
    return _core.TensorView(t.data_ptr(), "float32", list(t.shape), list(t.stride()), "cuda", 0)


@pytest.mark.parametrize(
    "change,match",
    [
        (
            dict(x=torch.ones(3, 2, 16, dtype=torch.int32)),
            "x must be float32 or float64 or float16 or bfloat16",
        ),
        (dict(x=torch.ones(3, 32)), r"x must be 3-D \[rows, heads, head_dim\]"),
        (dict(x=torch.ones(3, 2, 32)[..., ::2]), "x must be 3-D .* with unit stride on head_dim"),
        (dict(cos=torch.ones(3, 8, dtype=torch.bfloat16)), "cos must have x's dtype float32"),
        (dict(cos=torch.ones(4, 8)), r"cos must be \[3, rot\] with rot even, > 0 and <= head_dim 16"),
        (dict(cos=torch.ones(3, 7), sin=torch.ones(3, 7)), r"cos must be \[3, rot\] with rot even"),
        (dict(cos=torch.ones(3, 18), sin=torch.ones(3, 18)), r"cos must be \[3, rot\] .* <= head_dim 16"),
        (dict(sin=torch.ones(3, 6)), r"sin must be \[3, 8\] with unit column stride"),
        (dict(sin=torch.ones(3, 8, dtype=torch.float64)), "sin must have x's dtype float32"),
        (dict(sin=fake_cuda(torch.ones(3, 8))), "sin and x must be on the same device"),
        (dict(out=torch.empty(3, 16)), r"out must have shape \[3, 2, 16\]"),
        (dict(out=fake_cuda(torch.empty(3, 2, 16))), "out and x must be on the same device"),
    ],
)
def test_rope_rotate_errors_name_the_argument(change, match):
    args = dict(
        x=torch.ones(3, 2, 16), cos=torch.ones(3, 8), sin=torch.ones(3, 8), out=torch.full((3, 2, 16), 7.0)
    )
    args.update(change)
    v = {k: a if isinstance(a, _core.TensorView) else view(a) for k, a in args.items()}
    with pytest.raises(KindredValueError, match=match):
        _core.rope_rotate(v["x"], v["cos"], v["sin"], False, v["out"], 0)
    if isinstance(args["out"], torch.Tensor) and args["out"].shape == (3, 2, 16):
        assert (args["out"] == 7).all()  # a refused call writes nothing


@pytest.mark.parametrize(
    "change,match",
    [
        (
            dict(gate=torch.ones(2, 8, dtype=torch.int32)),
            "gate must be float32 or float64 or float16 or bfloat16",
        ),
        (dict(dout=torch.ones(2, 8, dtype=torch.float16)), "dout must have gate's dtype float32"),
        (dict(dout=torch.ones(2, 7)), r"dout must be \[2, 8\] with unit column stride"),
        (dict(up=torch.ones(2, 16)[:, ::2]), r"up must be \[2, 8\] with unit column stride"),
        (dict(up=fake_cuda(torch.ones(2, 8))), "up and gate must be on the same device"),
        (dict(dgate=torch.empty(8, 2)), r"dgate must have shape \[2, 8\]"),
        (dict(dup=torch.empty(2, 16)[:, :8]), "dup must be contiguous"),
    ],
)
def test_silu_mul_backward_errors_name_the_argument(change, match):
    args = dict(dout=torch.ones(2, 8), gate=torch.ones(2, 8), up=torch.ones(2, 8))
    args |= dict(dgate=torch.empty(2, 8), dup=torch.empty(2, 8))
    args.update(change)
    v = {k: a if isinstance(a, _core.TensorView) else view(a) for k, a in args.items()}
    with pytest.raises(KindredValueError, match=match):
        _core.silu_mul_backward(v["dout"], v["gate"], v["up"], v["dgate"], v["dup"], 0)


def test_rope_refuses_tables_that_want_a_gradient_or_do_not_fit():
    x, cos, sin = rope_inputs(2, 5, 3, 8, 6, torch.float32, 1)
    with pytest.raises(KindredValueError, match="cos must not require grad"):
        rope(x, cos.clone().requires_grad_(), sin)
    with pytest.raises(KindredValueError, match=r"sin must be \[2 or 1, 5, rot\]"):
        rope(x, cos, sin[:, :4])
    with pytest.raises(KindredValueError, match=r"x must be 4-D \[batch, tokens, heads, head_dim\]"):
        rope(x[0], cos, sin)


# --- the decode path through the fused ops ----------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    built = {}

    def get(name, dtype):
        if (name, dtype) not in built:
            path = tmp_path_factory.mktemp(name)
            saved_hf_model(name, path)
            built[name, dtype] = models.from_pretrained(path, dtype=dtype).eval()
        return built[name, dtype]

    return get


FUSABLE = [n for n in [*FAMILY_CONFIGS, *MOE_CONFIGS] if n not in ("gemma3", "qwen3_5")]


@pytest.mark.parametrize("name", FUSABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_equals_the_unfused_path(family, name, dtype):
    model = family(name, dtype)
    assert model.model.can_fuse_decode
    engine = Engine.for_model(model)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (6, 1, 11)]
    n = min(24, model.config.max_position_embeddings - 11)
    seen = {}
    for fused in (False, True):
        engine.fused = fused
        seen[fused] = [c.tokens for c in generate(model, prompts, SamplingConfig(max_new_tokens=n))]
        runner = Runner(engine, prompts, 4)  # one decode step's logits after the same prefill
        runner.prefill()
        seen[fused, "logits"] = runner.step(torch.tensor([p[-1] for p in prompts]))
    engine.fused = False
    assert seen[True] == seen[False]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(seen[True, "logits"], seen[False, "logits"]) < tol


def test_switching_fused_drops_the_captured_graphs(family):
    """A graph of one mode must not outlive a switch (the fused mode restacks the decode buffers)."""
    engine = Engine.for_model(family("qwen3", torch.float32))
    engine.graphs, engine._pool = {("key", 1, 128): "graph"}, "pool"
    engine.fused = engine.fused  # no switch: kept
    assert engine.graphs and engine._pool == "pool"
    engine.fused = not engine.fused
    assert engine.graphs == {} and engine._pool is None
    engine.fused = not engine.fused


@pytest.mark.parametrize("name", ["gemma3", "qwen3_5"])
def test_families_outside_the_fused_ops_say_so(family, name):
    model = family(name, torch.float32)
    assert not model.model.can_fuse_decode
