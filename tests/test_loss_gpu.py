"""The loss family on CUDA: the lce_* kernels against their CPU twins (outputs poisoned first), the whole op
against the float64 reference and torch's bf16/fp16 matmul + cross_entropy, no host sync, the memory budget
at (16384, 4096, 262144), torch.compile. Run: pytest -m gpu tests/test_loss_gpu.py"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from kindred import _core, _ops, _ops_loss, ops
from kindred.ops.loss import _linear_cross_entropy as lce

from .loss_reference import linear_cross_entropy_ref
from .test_loss import OPTIONS, make_inputs, run
from .tolerances import REL_ERR, rel_err

pytestmark = pytest.mark.gpu
LOW = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, *LOW]
STATE = _core.LCE_STATE


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


def _update(dev, logits, bias, y, state, argmax, acc, dtype, single, opt, col0, vocab):
    logits, state, argmax, acc = (x.clone().to(dev) for x in (logits, state, argmax, acc))
    t, c = logits.shape
    e = _ops_loss._aliased(logits.view(-1), t, c, dtype) if single else None
    v = _ops.view
    _core.lce_chunk_update(
        v(logits),
        None if bias is None else v(bias.to(dev)),
        v(y.to(dev)),
        col0,
        vocab,
        opt,
        v(state),
        v(argmax),
        None if e is None else v(e),
        v(acc) if single else None,
        _ops.stream(logits),
    )
    return state.cpu(), argmax.cpu(), None if e is None else e.float().cpu(), acc.cpu()


@pytest.mark.parametrize("t,c", [(1, 1000), (3, 257), (117, 4099)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("single", [False, True])
def test_chunk_update_matches_cpu_twin(t, c, dtype, bias_dtype, single):
    inputs = _chunk_inputs(t, c, dtype, t + c, bias_dtype)
    opt = _core.LceOptions(-100, 0.0, 0.0, 7.0 if t == 3 else 0.0)
    cpu = _update("cpu", *inputs, dtype, single, opt, 2 * c, 5 * c)
    gpu = _update("cuda", *inputs, dtype, single, opt, 2 * c, 5 * c)
    torch.testing.assert_close(gpu[0], cpu[0], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(gpu[1], cpu[1])
    if single:
        torch.testing.assert_close(gpu[2], cpu[2], rtol=REL_ERR[dtype], atol=1e-6)
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
    v = _ops.view
    results = {}
    for dev in ("cpu", "cuda"):
        lg = logits.clone().to(dev)
        g = _ops_loss._aliased(lg.view(-1), t, c, dtype)
        _core.lce_chunk_grad(
            v(lg), v(bias.to(dev)), v(y.to(dev)), c, vocab, opt, v(lse.to(dev)), v(coef.to(dev)), v(g), 0
        )
        out = {"grad": g.float().cpu()}
        outs = [torch.full((t,), float("nan"), device=dev) for _ in range(2)]  # poisoned
        hit = torch.full((t,), 0xFF, dtype=torch.uint8, device=dev)
        single = opts[2] == 0.0
        dh = torch.full((t, d), float("nan"), dtype=dtype, device=dev)
        a = acc.clone().to(dev) if single else None
        _core.lce_finalize(
            v(state.to(dev)),
            v(argmax.to(dev)),
            v(y.to(dev)),
            vocab,
            opt,
            v(outs[0]),
            v(outs[1]),
            v(hit),
            *((v(a), v(weight.to(dev)), v(wsum.to(dev)), v(scale.to(dev)), v(dh)) if single else (None,) * 5),
            _ops.stream(lg),
        )
        out.update(loss=outs[0].cpu(), lse=outs[1].cpu(), hit=hit.cpu())
        if single:
            out.update(dh=dh.float().cpu(), acc=a.cpu())
        results[dev] = out
    cpu, gpu = results["cpu"], results["cuda"]
    torch.testing.assert_close(gpu["grad"], cpu["grad"], rtol=REL_ERR[dtype], atol=1e-6)
    for name in ("loss", "lse"):
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(gpu["hit"], cpu["hit"]) and set(gpu["hit"].tolist()) <= {0, 1}
    if opts[2] == 0.0:
        assert not torch.isnan(gpu["dh"]).any()
        torch.testing.assert_close(gpu["dh"], cpu["dh"], rtol=REL_ERR[dtype], atol=1e-5)
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


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_sync(trainable, reduction):
    h, w, y, b = make_inputs(300, 256, 20000, dtype=torch.bfloat16, bias=True, seed=2)
    h, w, y, b = h.cuda().requires_grad_(), w.cuda().requires_grad_(trainable), y.cuda(), b.cuda()
    lce(h, w, y, bias=b, reduction=reduction, z_loss=1e-4).sum().backward()  # warm-up (capability probe)
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings():  # "prototype feature" warning; the mode must be restored regardless
            warnings.simplefilter("ignore", UserWarning)
            torch.cuda.set_sync_debug_mode("error")
        loss = lce(h, w, y, bias=b, reduction=reduction, z_loss=1e-4, label_smoothing=0.1)
        loss.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(h.grad).all()


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


@pytest.mark.parametrize("trainable", [False, True])
def test_peak_extra_memory_within_64_mib(trainable):
    n, d, v = 16384, 4096, 262144
    torch.manual_seed(0)
    w = (torch.randn(v, d, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_(trainable)
    y = torch.randint(0, v, (n,), device="cuda")
    h = (torch.randn(n, d, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    lce(h[:64], w, y[:64]).backward()  # warm-up: capability probe, cuBLAS workspace
    h.grad, w.grad = None, None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lce(h, w, y).backward()
    torch.cuda.synchronize()
    grads = h.numel() * 2 + (w.numel() * 2 if trainable else 0)
    extra = (torch.cuda.max_memory_allocated() - base - grads) / 2**20
    assert extra <= 64, f"{extra:.1f} MiB beyond the gradients"


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
