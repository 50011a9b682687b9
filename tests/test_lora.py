"""The lora op family: lora_linear forward and all three gradients against a float64 torch reference (dense,
NF4 and INT4g bases, dropout on and off, α/r and rsLoRA scaling, awkward shapes), gradcheck, the dropout
mask against an independent statement of its hash, custom-op registration, bad inputs, and CUDA vs CPU."""

import math

import numpy as np
import pytest
import torch

from kindred import _core, ops
from kindred._ops import lora as _ops_lora
from kindred._ops.adapter import stream, view
from kindred.errors import KindredValueError

from .helpers import randn
from .tolerances import REL_ERR, rel_err

REL_ERR64 = 1e-12
# (M, K, N, r): M = 1, 3, 117; K, N not multiples of 8; K <= N and K > N (the two CUDA forward plans).
DENSE_CASES = [(1, 24, 40, 8), (3, 37, 29, 8), (117, 45, 61, 16), (5, 19, 70, 19)]
# 4-bit bases need K a multiple of the INT4g group (32); K = 96 with NF4 blocks of 64 straddles rows.
QUANT_CASES = [(1, 64, 96, 8), (3, 96, 40, 16), (117, 160, 72, 8)]


def mask_reference(seed: int, m: int, k: int, p: float) -> torch.Tensor:
    """keep[m, k] from kindred/lora.h's hash, restated in numpy: splitmix64's finalizer of
    seed + golden · (index + 1); kept when its high 32 bits >= round(p · 2^32)."""
    u = np.uint64
    idx = np.arange(m * k, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = u(seed % 2**64) + u(0x9E3779B97F4A7C15) * (idx + u(1))
        z = (z ^ (z >> u(30))) * u(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> u(27))) * u(0x94D049BB133111EB)
        z = z ^ (z >> u(31))
    threshold = min(math.floor(p * 2**32 + 0.5), 2**32 - 1)
    return torch.from_numpy((z >> u(32)) >= u(threshold)).reshape(m, k)


def reference(x, w, a, b, bias, s, keep, p):
    """y in float64 torch, differentiable in x, a, b."""
    xd = x * keep / (1 - p) if p > 0 else x
    y = x @ w.T + s * (xd @ a.T) @ b.T
    return y if bias is None else y + bias


def make_base(kind, w):
    if kind == "nf4":
        q = ops.quantize_nf4(w.float(), 64, True)
        return q, q.dequantize(torch.float32).double()
    if kind == "int4g":
        q = ops.quantize_int4g(w.float(), 32)
        return q, q.dequantize(torch.float32).double()
    return w, w.double()


def problem(m, k, n, r, seed=0):
    x = randn((m, k), torch.float64, seed=seed, scale=1.0)
    w = randn((n, k), torch.float64, seed=seed + 1, scale=0.05)
    a = randn((r, k), torch.float64, seed=seed + 2, scale=0.1)
    b = randn((n, r), torch.float64, seed=seed + 3, scale=0.1)
    bias = randn((n,), torch.float64, seed=seed + 4, scale=0.1)
    return x, w, a, b, bias


def run_both(m, k, n, r, dtype, kind, p, rslora, device="cpu", with_bias=True):
    """kindred's y, dx, da, db on ``device`` in ``dtype`` and the float64 reference's, same inputs."""
    x, w, a, b, bias = problem(m, k, n, r, seed=m + k)
    base, w64 = make_base(kind, w.to(dtype) if kind == "dense" else w)
    s = ops.lora_scaling(r, 16.0, rslora)
    x, a, b, bias = (t.to(dtype) for t in (x, a, b, bias))
    bias = bias if with_bias else None
    dy = randn((m, n), dtype, seed=99, scale=1.0)
    seed = 12345 + m
    keep = mask_reference(seed, m, k, p)

    x64, a64, b64 = (t.double().requires_grad_() for t in (x, a, b))
    y64 = reference(x64, w64, a64, b64, None if bias is None else bias.double(), s, keep, p)
    y64.backward(dy.double())

    def dev(t):
        return t.to(device)

    xk, ak, bk = (dev(t).requires_grad_() for t in (x, a, b))
    base_k = base.to(device) if kind != "dense" else dev(base)
    yk = ops.lora_linear(
        xk, base_k, ak, bk, s, bias=None if bias is None else dev(bias), dropout_p=p, seed=seed
    )
    yk.backward(dev(dy))
    got = [yk.detach(), xk.grad, ak.grad, bk.grad]
    want = [y64.detach(), x64.grad, a64.grad, b64.grad]
    return got, want


def poison_scratch():
    for ws in _ops_lora.scratch_workspaces().values():
        ws.fill_(float("nan"))


def bound(dtype):
    return REL_ERR64 if dtype == torch.float64 else REL_ERR[dtype]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,k,n,r", DENSE_CASES)
def test_dense_base_forward_and_gradients(m, k, n, r, dtype, p):
    got, want = run_both(m, k, n, r, dtype, "dense", p, rslora=False)
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
        assert g.dtype == dtype
        assert rel_err(g, w) < bound(dtype), name


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["nf4", "int4g"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,r", QUANT_CASES)
def test_4bit_base_forward_and_gradients(m, k, n, r, dtype, kind, p, rslora):
    got, want = run_both(m, k, n, r, dtype, kind, p, rslora)
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
        assert rel_err(g, w) < bound(dtype), name


def test_scaling_rules():
    assert ops.lora_scaling(16, 32) == 2.0
    assert ops.lora_scaling(16, 32, rslora=True) == 8.0
    with pytest.raises(KindredValueError, match="r must be a positive int"):
        ops.lora_scaling(0, 8)


@pytest.mark.parametrize("kind", ["dense", "nf4", "int4g"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_gradcheck_float64(kind, p):
    x, w, a, b, bias = problem(6, 64, 40, 4, seed=3)
    base, _ = make_base(kind, w)
    x, a, b = (t.requires_grad_() for t in (x, a, b))

    def f(x, a, b):
        return ops.lora_linear(x.reshape(2, 3, 64), base, a, b, 1.7, bias=bias, dropout_p=p, seed=77)

    assert torch.autograd.gradcheck(f, (x, a, b))


def test_leading_shape_and_eval_mode():
    x, w, a, b, bias = problem(12, 24, 40, 8)
    y = ops.lora_linear(x.reshape(2, 3, 2, 24), w, a, b, 2.0, bias=bias, dropout_p=0.5, training=False)
    ref = reference(x, w, a, b, bias, 2.0, None, 0.0)
    assert y.shape == (2, 3, 2, 40)
    assert rel_err(y.reshape(12, 40), ref) < REL_ERR64


def test_dropout_mask_matches_its_independent_statement():
    x = torch.ones(37, 53, dtype=torch.float32)
    for seed, p in ((0, 0.1), (2**40 + 3, 0.5), (2**64 - 1, 0.9)):
        got = ops.lora_dropout(x, p, seed)
        keep = mask_reference(seed, 37, 53, p)
        expected = torch.where(keep, torch.tensor(np.float32(1 / (1 - p))), torch.tensor(0.0))
        assert torch.equal(got, expected), (seed, p)
    # Same seed, same mask; a tensor seed (no host sync) means the same as its int.
    seed_t = torch.tensor([5, 0], dtype=torch.int32)
    assert torch.equal(ops.lora_dropout(x, 0.3, 5), ops.lora_dropout(x, 0.3, seed_t))
    assert not torch.equal(ops.lora_dropout(x, 0.3, 5), ops.lora_dropout(x, 0.3, 6))


def test_dropout_seeds_come_from_the_generator():
    x, w, a, b, _ = problem(8, 24, 40, 8)
    b = b * 10
    y1 = ops.lora_linear(x, w, a, b, 1.0, dropout_p=0.5, generator=torch.Generator().manual_seed(1))
    y2 = ops.lora_linear(x, w, a, b, 1.0, dropout_p=0.5, generator=torch.Generator().manual_seed(1))
    y3 = ops.lora_linear(x, w, a, b, 1.0, dropout_p=0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


def test_workspace_base_is_read_in_place():
    x, w, a, b, bias = problem(5, 24, 40, 8)
    ws = ops.lora_workspace(w, 8)
    assert ws.shape == (40, 32) and torch.equal(ws[:, :24], w)
    y = ops.lora_linear(x, ws[:, :24], a, b, 2.0, bias=bias, workspace=ws)
    assert rel_err(y, reference(x, w, a, b, bias, 2.0, None, 0.0)) < REL_ERR64
    with pytest.raises(KindredValueError, match="workspace must be the"):
        ops.lora_linear(x, w, a, b, 2.0, workspace=ws)


def test_custom_ops_pass_opcheck_and_compile():
    x, w, a, b, bias = problem(7, 64, 40, 8)
    seed = torch.tensor([3, 4], dtype=torch.int32)
    args = (x, [w], "dense", 0, a, b, bias, 2.0, 0.2, seed)
    torch.library.opcheck(torch.ops.kindred.lora_linear.default, args)
    q = ops.quantize_nf4(w.float(), 64, False)
    parts = [q.packed, q.absmax, *(q.absmax.new_empty(0) for _ in range(3))]
    xf, af, bf = (t.float() for t in (x, a, b))
    torch.library.opcheck(
        torch.ops.kindred.lora_linear.default, (xf, parts, "nf4", 64, af, bf, None, 1.0, 0.0, None)
    )
    xs, dy = torch.empty(7, 8, dtype=torch.float64), randn((7, 40), torch.float64, seed=8)
    torch.library.opcheck(
        torch.ops.kindred.lora_linear_backward.default, (dy, x, [w], "dense", 0, a, b, xs, 2.0, 0.2, seed)
    )
    torch.library.opcheck(torch.ops.kindred.lora_dropout.default, (x, 0.5, seed))

    def step(x, a, b):
        return ops.lora_linear(x, w, a, b, 2.0, bias=bias, dropout_p=0.2, seed=seed).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    xa, aa, ba = (t.clone().requires_grad_() for t in (x, a, b))
    xe, ae, be = (t.clone().requires_grad_() for t in (x, a, b))
    compiled(xa, aa, ba).backward()
    step(xe, ae, be).backward()
    for g, e in ((xa, xe), (aa, ae), (ba, be)):
        assert torch.allclose(g.grad, e.grad, rtol=1e-12, atol=0)


def test_bad_inputs_name_the_argument():
    x, w, a, b, bias = problem(3, 24, 40, 8)
    with pytest.raises(
        KindredValueError, match=r"rank r = A.shape\[0\] must be in \[1, min\(K, N\) = 24\], got 0"
    ):
        ops.lora_linear(x, w, a[:0], b[:, :0], 1.0)
    big_a, big_b = randn((25, 24), torch.float64), randn((40, 25), torch.float64)
    with pytest.raises(KindredValueError, match=r"must be in \[1, min\(K, N\) = 24\], got 25"):
        ops.lora_linear(x, w, big_a, big_b, 1.0)
    with pytest.raises(KindredValueError, match=r"B \(lora_B\) must have shape \[N, r\] = \[40, 8\]"):
        ops.lora_linear(x, w, a, b.t().contiguous(), 1.0)
    with pytest.raises(KindredValueError, match=r"A \(lora_A\) must have shape \[r, K\] = \[8, 24\]"):
        ops.lora_linear(x, w, randn((8, 23), torch.float64), b, 1.0)
    with pytest.raises(KindredValueError, match="x must end in in_features=24"):
        ops.lora_linear(x[:, :20], w, a, b, 1.0)
    with pytest.raises(KindredValueError, match=r"A has dtype torch.float32 but x has torch.float64"):
        ops.lora_linear(x, w, a.float(), b, 1.0)
    with pytest.raises(KindredValueError, match=r"base has dtype torch.float32"):
        ops.lora_linear(x, w.float(), a, b, 1.0)
    with pytest.raises(KindredValueError, match=r"bias must have shape \[40\]"):
        ops.lora_linear(x, w, a, b, 1.0, bias=bias[:3])
    with pytest.raises(KindredValueError, match="base requires grad"):
        ops.lora_linear(x, w.clone().requires_grad_(), a, b, 1.0)
    with pytest.raises(KindredValueError, match=r"dropout_p must be in \[0, 1\)"):
        ops.lora_linear(x, w, a, b, 1.0, dropout_p=1.0)
    with pytest.raises(KindredValueError, match="scaling must be finite"):
        ops.lora_linear(x, w, a, b, float("nan"))
    with pytest.raises(KindredValueError, match="base must be a weight tensor"):
        ops.lora_linear(x, w.numpy(), a, b, 1.0)
    with pytest.raises(KindredValueError, match="seed tensor must be int32"):
        ops.lora_linear(x, w, a, b, 1.0, dropout_p=0.1, seed=torch.zeros(2))
    # The core's own checks, reached directly.
    y, xs = torch.empty(3, 40, dtype=torch.float64), torch.empty(3, 8, dtype=torch.float64)
    with pytest.raises(KindredValueError, match="needs a seed"):
        _core.lora_linear(*(view(t) for t in (x, w, a, b)), None, 1.0, 0.5, None, view(y), view(xs))
    with pytest.raises(KindredValueError, match=r"xs must have shape \[3, 8\]"):
        _core.lora_linear(*(view(t) for t in (x, w, a, b)), None, 1.0, 0.0, None, view(y), view(xs[:, :4]))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["dense", "workspace", "nf4", "int4g"])
@pytest.mark.parametrize("m,k,n,r", [*DENSE_CASES[:2], *QUANT_CASES])
def test_cuda_plan_run_on_cpu_matches_the_reference(m, k, n, r, kind, p):
    """The CUDA GEMM plan (both forward rules, the one-GEMM backward, the workspace) is torch ops, so it runs
    on CPU tensors too: checked here against the C++ reference, the scratch workspace poisoned first."""
    if kind in ("nf4", "int4g") and k % 32:
        pytest.skip("4-bit bases need K a multiple of 32")
    x, w, a, b, bias = problem(m, k, n, r, seed=11)
    base, w64 = make_base("dense" if kind == "workspace" else kind, w)
    fmt, parts, param = "dense", [w], 0
    if kind == "workspace":
        ws = ops.lora_workspace(w, r)
        ws[:, k:] = float("nan")
        fmt, parts = "workspace", [ws]
    elif kind != "dense":
        x, a, b, bias = (t.float() for t in (x, a, b, bias))
        fmt, parts, param = (
            kind,
            ops.lora._base_args(base, x, None)[1],
            base.blocksize if kind == "nf4" else 32,
        )
    seed = torch.tensor([9, 9], dtype=torch.int32) if p else None
    poison_scratch()
    y, xs = _ops_lora.forward_plan(x, fmt, parts, param, a, b, bias, 1.5, p, seed)
    y_ref, xs_ref = torch.ops.kindred.lora_linear(x, parts, fmt, param, a, b, bias, 1.5, p, seed)
    dy = randn((m, n), x.dtype, seed=5, scale=1.0)
    grads = _ops_lora.backward_plan(dy, x, fmt, parts, param, a, b, xs, 1.5, p, seed)
    refs = torch.ops.kindred.lora_linear_backward(dy, x, parts, fmt, param, a, b, xs_ref, 1.5, p, seed)
    tol = REL_ERR64 if x.dtype == torch.float64 else REL_ERR[torch.float32]
    for name, g, ref in zip(
        ("y", "xs", "dx", "dA", "dB"), (y, xs, *grads), (y_ref, xs_ref, *refs), strict=True
    ):
        assert rel_err(g, ref) < tol, name
    assert rel_err(
        y_ref,
        reference(
            x.double(),
            w64,
            a.double(),
            b.double(),
            bias.double(),
            1.5,
            mask_reference(2**32 * 9 + 9, m, k, p),
            p,
        ),
    ) < (REL_ERR64 if x.dtype == torch.float64 else 1e-5)


def lora_call(x, base, a, b, bias, p, kind, workspace=None):
    """y, (dx, dA, dB) and y's grad_fn name of ops.lora_linear for dy = cos(index), x, a, b fresh leaves."""
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y = ops.lora_linear(x, base, a, b, 1.5, bias=bias, dropout_p=p, seed=2**33 + 5, workspace=workspace)
    dy = torch.arange(y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape).cos()
    y.backward(dy)
    return y.detach(), (x.grad, a.grad, b.grad), type(y.grad_fn).__name__


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["dense", "workspace", "nf4", "int4g"])
@pytest.mark.parametrize("m,k,n,r", [(3, 37, 29, 8), (117, 45, 61, 16), (5, 64, 96, 8), (9, 96, 40, 16)])
def test_eager_function_matches_the_custom_op(m, k, n, r, kind, p, monkeypatch):
    """The eager CUDA path (LoraLinearFunction around the plan), forced on the CPU through ops.lora_linear,
    against the custom op (the C++ reference on the CPU): the same y and gradients (K > N and K <= N, bias,
    dropout); and bitwise the plan itself, with the same saved tensors and xs as the op's autograd."""
    if kind in ("nf4", "int4g") and k % 32:
        pytest.skip("4-bit bases need K a multiple of 32")
    x, w, a, b, bias = problem(m, k, n, r, seed=21)
    base, workspace = w, None
    if kind == "workspace":
        workspace = ops.lora_workspace(w, r)
        workspace[:, k:] = float("nan")  # scratch columns: the backward must write s·B over them
        base = workspace[:, :k]
    elif kind != "dense":
        base, _ = make_base(kind, w)
        x, a, b, bias = (t.float() for t in (x, a, b, bias))
    poison_scratch()
    y_op, grads_op, op_node = lora_call(x, base, a, b, bias, p, kind, workspace)
    monkeypatch.setattr(ops.lora, "_eager", lambda t: True)
    poison_scratch()
    y_fn, grads_fn, fn_node = lora_call(x, base, a, b, bias, p, kind, workspace)
    assert "LoraLinearFunction" in fn_node and "LoraLinearFunction" not in op_node
    tol = REL_ERR64 if x.dtype == torch.float64 else REL_ERR[torch.float32]
    for name, g, ref in zip(("y", "dx", "dA", "dB"), (y_fn, *grads_fn), (y_op, *grads_op), strict=True):
        assert g.dtype == ref.dtype and g.shape == ref.shape
        assert rel_err(g, ref) < tol, name

    # Bitwise the plan called directly, and the op's saved tensors and outputs.
    fmt, parts, param = ops.lora._base_args(base, x, workspace)[:3]
    seed = ops.lora._seed_tensor(2**33 + 5, None, x.device) if p else None
    y_plan, xs_plan = _ops_lora.forward_plan(x, fmt, parts, param, a, b, bias, 1.5, p, seed)
    dy = torch.arange(m * n, dtype=x.dtype).reshape(m, n).cos()
    grads_plan = _ops_lora.backward_plan(dy, x, fmt, parts, param, a, b, xs_plan, 1.5, p, seed)
    assert torch.equal(y_fn, y_plan)
    for g, ref in zip(grads_fn, grads_plan, strict=True):
        assert torch.equal(g, ref)
    args = (x, parts, fmt, param, a.clone().requires_grad_(), b, bias, 1.5, p, seed)
    (y1, xs1), (y2, xs2) = _ops_lora.LoraLinearFunction.apply(*args), torch.ops.kindred.lora_linear(*args)
    assert torch.equal(xs1, xs_plan) and rel_err(xs1, xs2) < tol and not xs1.requires_grad
    saved1, saved2 = y1.grad_fn.saved_tensors, y2.grad_fn.saved_tensors
    assert len(saved1) == len(saved2)
    for t1, t2 in zip(saved1, saved2, strict=True):  # the inputs themselves; xs by value
        assert (t1 is None and t2 is None) or t1.data_ptr() == t2.data_ptr() or rel_err(t1, t2) < tol


# ---- CUDA: cuBLAS plan and dropout kernel vs the CPU reference --------------------------------------------

GPU_CASES = [(1, 64, 96, 8), (3, 96, 40, 16), (117, 160, 72, 8), (130, 256, 512, 64), (64, 512, 128, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("kind", ["dense", "nf4", "int4g"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("m,k,n,r", GPU_CASES)
def test_cuda_matches_the_float64_reference(m, k, n, r, dtype, kind, p):
    poison_scratch()
    got, want = run_both(m, k, n, r, dtype, kind, p, rslora=True, device="cuda")
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
        assert g.is_cuda
        assert rel_err(g, w) < REL_ERR[torch.bfloat16 if dtype == torch.bfloat16 else torch.float16], name


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,r", [(3, 37, 29, 8), (117, 45, 61, 16)])
def test_cuda_dense_awkward_widths(m, k, n, r):
    got, want = run_both(m, k, n, r, torch.bfloat16, "dense", 0.3, rslora=False, device="cuda")
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
        assert rel_err(g, w) < REL_ERR[torch.bfloat16], name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_dropout_kernel_is_bit_exact_with_cpu(dtype):
    x = randn((117, 333), dtype, seed=5, scale=1.0)
    seed = torch.tensor([-7, 99], dtype=torch.int32)
    for accumulate in (False, True):
        for p in (0.0, 0.1, 0.6):
            start = randn((117, 340), dtype, seed=6)[:, :333]  # strided rows
            cpu_out = start.clone()
            gpu_out = torch.full((117, 340), float("nan"), dtype=dtype, device="cuda")[:, :333]
            if accumulate:
                gpu_out.copy_(start)
            for out, xx in ((cpu_out, x), (gpu_out, x.cuda())):
                _core.lora_dropout(
                    view(xx),
                    p,
                    view(seed.to(xx.device)),
                    view(out),
                    accumulate,
                    stream(xx),
                )
            torch.cuda.synchronize()
            assert torch.equal(gpu_out.cpu(), cpu_out), (p, accumulate)


@pytest.mark.gpu
def test_cuda_workspace_path_and_poisoned_scratch():
    x, w, a, b, bias = (t.to(torch.bfloat16) for t in problem(33, 128, 256, 16))
    ws = ops.lora_workspace(w.cuda(), 16)
    ws[:, 128:].fill_(float("nan"))  # B's columns and the padding are scratch: the op must overwrite B's
    y = ops.lora_linear(x.cuda(), ws[:, :128], a.cuda(), b.cuda(), 2.0, bias=bias.cuda(), workspace=ws)
    ref = reference(*(t.double() for t in (x, w, a, b, bias)), 2.0, None, 0.0)
    assert rel_err(y, ref) < REL_ERR[torch.bfloat16]
    with pytest.raises(KindredValueError, match="float64 lora_linear runs on the CPU only"):
        ops.lora_linear(*(t.double().cuda() for t in (x, w, a, b)), 1.0)
    with pytest.raises(KindredValueError, match="base is on cpu but x is on cuda"):
        ops.lora_linear(x.cuda(), w, a.cuda(), b.cuda(), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("kind", ["dense", "nf4", "int4g"])
@pytest.mark.parametrize("m,k,n,r", [(130, 256, 512, 64), (64, 512, 128, 16)])
def test_cuda_eager_function_is_the_custom_op_bitwise(m, k, n, r, kind, p):
    """Eager CUDA calls take LoraLinearFunction; the custom op (what torch.compile traces) runs the same
    plan: bitwise the same y and gradients; compiled, the same within bf16 rounding."""
    x, w, a, b, bias = (t.to(torch.bfloat16).cuda() for t in problem(m, k, n, r, seed=4))
    base = make_base(kind, w)[0]
    poison_scratch()
    y_fn, grads_fn, node = lora_call(x, base, a, b, bias, p, kind)
    assert "LoraLinearFunction" in node
    fmt, parts, param = ops.lora._base_args(base, x, None)[:3]
    seed = ops.lora._seed_tensor(2**33 + 5, None, x.device) if p else None
    xo, ao, bo = (t.clone().requires_grad_() for t in (x, a, b))
    y_op, _ = torch.ops.kindred.lora_linear(xo, parts, fmt, param, ao, bo, bias, 1.5, p, seed)
    assert "LoraLinearFunction" not in type(y_op.grad_fn).__name__
    dy = torch.arange(m * n, dtype=x.dtype, device=x.device).reshape(m, n).cos()
    y_op.backward(dy)
    for name, g, ref in zip(
        ("y", "dx", "dA", "dB"), (y_fn, *grads_fn), (y_op, xo.grad, ao.grad, bo.grad), strict=True
    ):
        assert torch.equal(g, ref), name

    def step(x, a, b):
        return ops.lora_linear(x, base, a, b, 1.5, bias=bias, dropout_p=p, seed=seed)

    xc, ac, bc = (t.clone().requires_grad_() for t in (x, a, b))
    torch.compiler.reset()  # a fresh cache per case: each one's closure would count as a recompile
    y_c = torch.compile(step, backend="aot_eager", fullgraph=True)(xc, ac, bc)
    y_c.backward(dy)
    for name, g, ref in zip(
        ("y", "dx", "dA", "dB"), (y_c, xc.grad, ac.grad, bc.grad), (y_fn, *grads_fn), strict=True
    ):
        assert rel_err(g, ref) < REL_ERR[torch.bfloat16], name
