"""The loss family on CUDA: the lce_* kernels against their CPU twins (outputs poisoned first), the whole op
against the float64 reference and torch's bf16/fp16 matmul + cross_entropy, no host sync, the memory budget
at (16384, 4096, 262144), torch.compile. Run: pytest -m gpu tests/test_loss_gpu.py"""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from kindred import _core, ops
from kindred._ops import loss as _ops_loss
from kindred._ops.adapter import stream, view
from kindred.ops.loss import _linear_cross_entropy as lce

from .loss_reference import linear_cross_entropy_ref
from .test_loss import OPTIONS, make_inputs, run
from .tolerances import REL_ERR, rel_err

pytestmark = pytest.mark.gpu
LOW = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, *LOW]
STATE = _core.LCE_STATE
U32 = 2.0**-24  # unit roundoff of float32


def _chunk_inputs(t, c, dtype, seed, bias_dtype):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, c, generator=g) * 4
    bias = None if bias_dtype is None else (torch.randn(c, generator=g)).to(bias_dtype)
    # Targets before, in and after the chunk [2c, 3c) the tests use.
    y = torch.randint(c, 4 * c, (t,), generator=g, dtype=torch.int32)
    y[::4] = -100
    state = torch.empty(t, _core.LCE_STATE_COLS)
    state[:, STATE["max"]] = torch.randn(t, generator=g) * 6  # a previous chunk's state
    state[:, STATE["sum"]] = torch.rand(t, generator=g) * 50 + 1
    state[:, STATE["ref"]] = state[:, STATE["max"]] - 20 * torch.rand(t, generator=g)  # some rows rescale
    state[:, STATE["sum_z"]] = torch.randn(t, generator=g)
    state[:, STATE["z_target"]] = float("nan")
    state[:, STATE["raw_max"]] = torch.randn(t, generator=g) * 6 + 6
    argmax = torch.randint(0, c, (t,), generator=g, dtype=torch.int32)
    acc = torch.randn(t, 33, generator=g)
    return logits, bias, y, state, argmax, acc


def _on(dev, *tensors):
    """Fresh copies of ``tensors`` on ``dev`` for the caller to hold: a TensorView keeps only the pointer, so
    a temporary (``v(x.to(dev))``) would go back to the caching allocator, and to the next tensor, before
    the kernel reads it."""
    return [None if x is None else x.clone().to(dev) for x in tensors]


def _sum_atol(z, c):
    """Bound on the difference of two float32 sums of the c terms of each row of z taken in different orders:
    each is within (c − 1)·u·Σ|z| of the exact sum (u = 2⁻²⁴)."""
    return 2 * c * U32 * z.abs().sum(-1)


def _final_z(logits, bias, cap):
    r = logits.double() + (0 if bias is None else bias.double())
    return cap * torch.tanh(r / cap) if cap else r


def _update(dev, logits, bias, y, state, argmax, acc, dtype, single, opt, col0, vocab):
    logits, bias, y, state, argmax, acc = _on(dev, logits, bias, y, state, argmax, acc)
    t, c = logits.shape
    e = _ops_loss._aliased(logits.view(-1), t, c, dtype) if single else None
    v = view
    _core.lce_chunk_update(
        v(logits),
        None if bias is None else v(bias),
        v(y),
        col0,
        vocab,
        opt,
        v(state),
        v(argmax),
        None if e is None else v(e),
        v(acc) if single else None,
        stream(logits),
    )
    return state.cpu(), argmax.cpu(), None if e is None else e.float().cpu(), acc.cpu()


@pytest.mark.parametrize("t,c", [(1, 1000), (3, 257), (117, 4099)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("single", [False, True])
def test_chunk_update_matches_cpu_twin(t, c, dtype, bias_dtype, single):
    inputs = _chunk_inputs(t, c, dtype, t + c, bias_dtype)
    cap = 7.0 if t == 3 else 0.0
    opt = _core.LceOptions(-100, 0.0, 0.0, cap)
    cpu = _update("cpu", *inputs, dtype, single, opt, 2 * c, 5 * c)
    gpu = _update("cuda", *inputs, dtype, single, opt, 2 * c, 5 * c)
    # max, ref, z of the target, raw max: one rounding (or a tanhf / expf of a few ulps) apart.
    for col in ("max", "ref", "z_target", "raw_max"):
        i = STATE[col]
        torch.testing.assert_close(gpu[0][:, i], cpu[0][:, i], rtol=1e-6, atol=0, equal_nan=True, msg=col)
    # The sums: the kernel adds in a different order than the CPU loop (bounds from c and the terms).
    z = _final_z(inputs[0], inputs[1], cap)
    prev = inputs[3]
    i = STATE["sum"]
    torch.testing.assert_close(gpu[0][:, i], cpu[0][:, i], rtol=2 * (c + 16) * U32, atol=0)
    i = STATE["sum_z"]
    diff = (gpu[0][:, i] - cpu[0][:, i]).abs().double()
    assert (diff <= _sum_atol(z, c) + 4 * U32 * prev[:, i].abs().double()).all(), diff
    assert torch.equal(gpu[1], cpu[1])
    if single:
        assert rel_err(gpu[2], cpu[2]) < REL_ERR[dtype]
        torch.testing.assert_close(gpu[3], cpu[3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", [(0.0, 0.0, 0.0), (0.1, 0.01, 0.0), (0.1, 0.01, 5.0)])
def test_chunk_grad_and_finalize_match_cpu_twins(dtype, opts):
    t, c, d, vocab = 117, 3001, 40, 9000
    logits, bias, y, state, argmax, acc = _chunk_inputs(t, c, dtype, 5, torch.float32)
    y = (y - c).clamp(max=vocab - 1)  # targets around the chunk [c, 2c), in the vocabulary
    y[::4] = -100
    state[:, STATE["z_target"]] = torch.randn(t) * 3
    acc = torch.randn(t, d)
    opt = _core.LceOptions(-100, *opts)
    lse = torch.rand(t) * 3 + 8
    coef = torch.randn(t)
    weight = torch.randn(vocab, d).to(dtype)
    wsum = weight.float().sum(0)
    scale = torch.tensor([0.01])
    single = opts[2] == 0.0
    v = view
    results = {}
    for dev in ("cpu", "cuda"):
        lg, b, yy, ls, cf, st, am, a, w, ws, sc = _on(
            dev, logits, bias, y, lse, coef, state, argmax, acc, weight, wsum, scale
        )
        g = _ops_loss._aliased(lg.view(-1), t, c, dtype)
        _core.lce_chunk_grad(v(lg), v(b), v(yy), c, vocab, opt, v(ls), v(cf), v(g), stream(lg))
        out = {"grad": g.float().cpu()}
        outs = [torch.full((t,), float("nan"), device=dev) for _ in range(2)]  # poisoned
        hit = torch.full((t,), 0xFF, dtype=torch.uint8, device=dev)
        dh = torch.full((t, d), float("nan"), dtype=dtype, device=dev)
        _core.lce_finalize(
            v(st),
            v(am),
            v(yy),
            vocab,
            opt,
            v(outs[0]),
            v(outs[1]),
            v(hit),
            *((v(a), v(w), v(ws), v(sc), v(dh)) if single else (None,) * 5),
            stream(lg),
        )
        out.update(loss=outs[0].cpu(), lse=outs[1].cpu(), hit=hit.cpu())
        if single:
            out.update(dh=dh.float().cpu(), acc=a.cpu())
        results[dev] = out
    cpu, gpu = results["cpu"], results["cuda"]
    assert rel_err(gpu["grad"], cpu["grad"]) < REL_ERR[dtype]
    assert not gpu["grad"][::4].any()  # ignored rows
    # lse = max + log(sum) and the loss's four terms: a few ulps of the terms apart (expf, logf, FMA).
    mx, sm = state[:, STATE["max"]].double(), state[:, STATE["sum"]].double()
    l64 = mx + sm.log()
    eps, lam = opts[0], opts[1]
    terms = {
        "lse": mx.abs() + sm.log().abs(),
        "loss": l64.abs()
        + state[:, STATE["z_target"]].double().abs()
        + lam * l64**2
        + eps / vocab * state[:, STATE["sum_z"]].double().abs(),
    }
    for name, scale_ in terms.items():
        assert not torch.isnan(gpu[name]).any(), name
        diff = (gpu[name] - cpu[name]).abs().double()
        assert (diff <= 16 * U32 * scale_).all(), (name, diff.max())
    assert torch.equal(gpu["hit"], cpu["hit"]) and set(gpu["hit"].tolist()) <= {0, 1}
    if single:
        assert rel_err(gpu["dh"], cpu["dh"]) < REL_ERR[dtype]
        assert not gpu["acc"].any()  # zeroed for the next token block


def _torch_errors(h, w, y, dtype):
    """Errors of torch's matmul + cross_entropy in ``dtype`` against float64 (loss, dH, dW)."""
    hl = h.to("cuda", dtype).clone().requires_grad_()
    wl = w.to("cuda", dtype).clone().requires_grad_()
    loss = F.cross_entropy((hl @ wl.T).float(), y.cuda())
    loss.backward()
    h6, w6 = h.double().clone().requires_grad_(), w.double().clone().requires_grad_()
    ref = linear_cross_entropy_ref(h6, w6, y)[0]
    ref.backward()
    return rel_err(loss.detach(), ref.detach()), rel_err(hl.grad, h6.grad), rel_err(wl.grad, w6.grad)


def _run_cuda(h, w, y, b, reduction, trainable, opts, **kw):
    dev = {"h": h.cuda(), "w": w.cuda(), "y": y.cuda(), "b": None if b is None else b.cuda()}
    got, want = run(
        {"impl": "chunked", **kw}, dev["h"], dev["w"], dev["y"], dev["b"], reduction, trainable, opts
    )
    return got, want


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3, 117])
@pytest.mark.parametrize("v", [1000, 50257])
@pytest.mark.parametrize("opt", ["plain", "all", "smooth_zloss_bias"])
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("chunking", ["auto", "small"])
def test_cuda_matches_float64_reference(dtype, n, v, opt, trainable, chunking):
    opts = OPTIONS[opt]
    h, w, y, b = make_inputs(n, 128, v, dtype=dtype, bias=opts.get("bias", False), seed=n + v)
    kw = {"block_rows": 32, "chunk_cols": 1536} if chunking == "small" else {}
    for reduction in ("mean", "none"):
        got, want = _run_cuda(h, w, y, b, reduction, trainable, opts, **kw)
        assert rel_err(got["loss"], want["loss"]) < 2e-5
        for name in set(want) - {"loss"}:
            assert got[name].dtype == dtype
            assert rel_err(got[name], want[name]) < REL_ERR[dtype], (name, reduction)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("trainable", [False, True])
def test_cuda_no_worse_than_torch_in_low_precision(dtype, trainable):
    h, w, y, _ = make_inputs(1024, 512, 32000, dtype=dtype, seed=11)
    t_loss, t_dh, t_dw = _torch_errors(h, w, y, dtype)
    got, want = _run_cuda(h, w, y, None, "mean", trainable, {})
    assert rel_err(got["loss"], want["loss"]) <= 2 * t_loss + 1e-6
    assert rel_err(got["d_hidden"], want["d_hidden"]) <= 2 * t_dh + 1e-4
    if trainable:
        assert rel_err(got["d_weight"], want["d_weight"]) <= 2 * t_dw + 1e-4


@contextlib.contextmanager
def sync_raises():
    """Host synchronizations raise inside the block; the previous mode comes back on exit, even on failure."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():  # torch warns once that the mode is a prototype feature
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("with_rows", [False, True])
def test_no_host_sync(trainable, reduction, with_rows):
    h, w, y, b = make_inputs(300, 256, 20000, dtype=torch.bfloat16, bias=True, seed=2)
    rows = (y != -100).nonzero().squeeze(1) if with_rows else None  # host-side, as a trainer's batch
    h, w, y, b = h.cuda().requires_grad_(), w.cuda().requires_grad_(trainable), y.cuda(), b.cuda()
    kw = {"bias": b, "reduction": reduction, "z_loss": 1e-4, "valid_rows": rows}
    lce(h, w, y, **kw).sum().backward()  # warm-up (capability probe)
    h.grad = None
    torch.cuda.synchronize()
    with sync_raises():
        loss = lce(h, w, y, label_smoothing=0.1, **kw)
        loss.sum().backward()
    assert torch.isfinite(h.grad).all() and h.grad.any()


def test_all_ignored_and_out_of_range_targets_on_cuda():
    h, w, y, _ = make_inputs(64, 64, 1000, dtype=torch.bfloat16)
    h, w, y = h.cuda().requires_grad_(), w.cuda(), y.cuda()
    loss = ops.linear_cross_entropy(h, w, torch.full_like(y, -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and not h.grad.any()
    # Out of range on CUDA: no sync to raise, so that token's loss (and the mean) is NaN.
    bad = y.clone()
    bad[5] = 1000
    _, stats = ops.linear_cross_entropy(h.detach(), w, bad, reduction="none", return_stats=True)
    assert torch.isnan(stats.token_loss[5]) and not torch.isnan(stats.token_loss[6:]).any()


def _peak_extra_mib(h, w, y, trainable, **kw):
    """Peak memory (MiB) of the forward and of the backward beyond what was allocated before each, less the
    gradients each one makes: dH in the forward of the single pass (frozen W), dH and dW in the backward of
    the two passes."""
    w.requires_grad_(trainable)
    lce(h, w, y, **kw).backward()  # warm-up at the same shapes: capability probe, cuBLAS workspaces
    h.grad, w.grad = None, None
    peaks = []
    torch.cuda.synchronize()
    for phase in ("forward", "backward"):
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if phase == "forward":
            loss = lce(h, w, y, **kw)
        else:
            loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    dh, dw = h.numel() * h.element_size(), w.numel() * w.element_size()
    fwd, bwd = (peaks[0], peaks[1] - dh - dw) if trainable else (peaks[0] - dh, peaks[1])
    h.grad, w.grad = None, None
    return fwd / 2**20, bwd / 2**20


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("with_rows", [False, True])
def test_peak_extra_memory_follows_the_plan(trainable, with_rows):
    # The chunk buffers of the plan (logits T × C fp32, [T, D] fp32 accumulator and gathered rows) plus O(N)
    # row buffers. The single pass's backward only scales dH in place: an [N, D] tensor there (e.g. zeros
    # autograd made for the unused dH output, 8 MiB) breaks its 1 MiB bound.
    n, d, v = 4096, 1024, 32768
    h, w, y, _ = make_inputs(n, d, v, dtype=torch.bfloat16, seed=4)
    rows = (y != -100).nonzero().squeeze(1) if with_rows else None
    h, w, y = h.cuda().requires_grad_(), w.cuda(), y.cuda()
    gather = h.element_size() if with_rows else 0
    t, c = _ops_loss.plan(n, d, v, not trainable, gather_itemsize=gather)
    bound = (4 * t * c + (4 + gather) * t * d + 64 * n) / 2**20 + 1.0
    fwd, bwd = _peak_extra_mib(h, w, y, trainable, valid_rows=rows)
    assert max(fwd, bwd) <= bound, (
        f"forward {fwd:.1f} / backward {bwd:.1f} MiB; plan: {bound:.1f} (T={t}, C={c})"
    )
    if not trainable:
        assert bwd <= 1.0, f"the single pass's backward took {bwd:.1f} MiB"


@pytest.mark.parametrize("trainable", [False, True])
def test_peak_extra_memory_within_64_mib(trainable):
    n, d, v = 16384, 4096, 262144
    torch.manual_seed(0)
    w = (torch.randn(v, d, device="cuda") * 0.02).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), device="cuda")
    h = (torch.randn(n, d, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    fwd, bwd = _peak_extra_mib(h, w, y, trainable)
    assert max(fwd, bwd) <= 64, f"forward {fwd:.1f} / backward {bwd:.1f} MiB beyond the gradients"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("opt", ["plain", "all"])
def test_cuda_valid_rows_match_float64_reference(dtype, trainable, opt):
    opts = OPTIONS[opt]
    h, w, y, b = make_inputs(
        117, 128, 5000, dtype=dtype, bias=opts.get("bias", False), seed=9, ignore_every=3
    )
    rows = (y != -100).nonzero().squeeze(1)
    for reduction in ("mean", "none"):
        got, want = _run_cuda(
            h, w, y, b, reduction, trainable, opts, block_rows=32, chunk_cols=1536, valid_rows=rows
        )
        assert rel_err(got["loss"], want["loss"]) < 2e-5
        for name in set(want) - {"loss"}:
            assert rel_err(got[name], want[name]) < REL_ERR[dtype], (name, reduction)
        assert not got["d_hidden"][y.cuda() == -100].any()


def test_compile_on_cuda():
    h, w, y, b = make_inputs(117, 128, 3000, dtype=torch.bfloat16, bias=True)
    h, w, y, b = h.cuda(), w.cuda(), y.cuda(), b.cuda()

    def step(hh):
        return ops.linear_cross_entropy(hh, w, y, bias=b, softcap=20.0)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (step, compiled):
        hh = h.clone().requires_grad_()
        fn(hh).backward()
        grads.append(hh.grad)
    torch.testing.assert_close(grads[0], grads[1])
