"""The loss family on the CPU: kindred.ops.linear_cross_entropy against a float64 reference and torch fp32,
every option, both implementations (the C++ reference and the chunked path the GPU runs), gradcheck, the
all-ignored rule, stats, torch.compile, and every bad input. GPU tests: tests/test_loss_gpu.py."""

import math

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from kindred import _core, nn, ops
from kindred._ops import loss as _ops_loss
from kindred._ops.adapter import view
from kindred.errors import KindredValueError
from kindred.ops.loss import _linear_cross_entropy as lce

from .loss_reference import linear_cross_entropy_ref
from .tolerances import REL_ERR, rel_err

OPTIONS = {
    "plain": {},
    "smooth": {"label_smoothing": 0.1},
    "zloss": {"z_loss": 1e-3},
    "softcap": {"softcap": 5.0},
    "bias": {"bias": True},
    "all": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0, "bias": True},
    "smooth_zloss_bias": {"label_smoothing": 0.2, "z_loss": 1e-2, "bias": True},
}
# (options, reduction, trainable weight): each option with mean, and the full set with every reduction.
CASES = [(o, "mean", t) for o in OPTIONS for t in (False, True)] + [
    (o, r, t) for o in ("plain", "all") for r in ("sum", "none") for t in (False, True)
]
IMPLS = {
    "reference": {"impl": "reference"},
    "chunked": {"impl": "chunked", "block_rows": 50, "chunk_cols": 4000},
}


def make_inputs(n, d, v, dtype=torch.float32, seed=0, bias=False, ignore_every=5):
    """Hidden states aligned with their target rows plus noise (a peaked softmax, as a trained model's)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    y = torch.randint(0, v, (n,), generator=g)
    h = 2.0 * w[y] * d**0.5 / 4 + torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5
    if ignore_every:
        y[::ignore_every] = -100
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.3 if bias else None
    h, w = h.to(dtype), w.to(dtype)
    return h, w, y, None if b is None else b.to(dtype)


def run(impl_kw, h, w, y, b, reduction, trainable, opts, seed=1, **kw):
    """Loss and gradients (hidden, weight, bias) of kindred and of the float64 reference for one draw of
    grad_output."""
    o = {k: v for k, v in opts.items() if k != "bias"}
    hl = h.detach().clone().requires_grad_()
    wl = w.detach().clone().requires_grad_(trainable)
    bl = None if b is None else b.detach().clone().requires_grad_(trainable)
    out = lce(hl, wl, y, bias=bl, reduction=reduction, **o, **impl_kw, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        out.device
    )
    (out * g.to(out.dtype)).sum().backward()
    h6 = h.double().clone().requires_grad_()
    w6 = w.double().clone().requires_grad_(trainable)
    b6 = None if b is None else b.double().clone().requires_grad_(trainable)
    ref, _, _ = linear_cross_entropy_ref(h6, w6, y, bias=b6, reduction=reduction, **o)
    (ref * g).sum().backward()
    got = {"loss": out.detach(), "d_hidden": hl.grad}
    want = {"loss": ref.detach(), "d_hidden": h6.grad}
    if trainable:
        got["d_weight"], want["d_weight"] = wl.grad, w6.grad
        if b is not None:
            got["d_bias"], want["d_bias"] = bl.grad, b6.grad
    return got, want


def torch_fp32_errors(h, w, y, b, reduction, opts):
    """Errors of torch's fp32 matmul + cross_entropy against the float64 reference (the k·torch rule)."""
    hl, wl = h.float().clone().requires_grad_(), w.float().clone().requires_grad_()
    logits = hl @ wl.T + (0 if b is None else b.float())
    if opts.get("softcap"):
        logits = opts["softcap"] * torch.tanh(logits / opts["softcap"])
    eps = opts.get("label_smoothing", 0.0)
    loss = F.cross_entropy(logits, y, reduction=reduction, label_smoothing=eps)
    if opts.get("z_loss"):
        zl = opts["z_loss"] * torch.logsumexp(logits, -1) ** 2 * (y != -100)
        loss = loss + (
            zl if reduction == "none" else zl.sum() / ((y != -100).sum() if reduction == "mean" else 1)
        )
    loss.sum().backward()
    o = {k: v for k, v in opts.items() if k != "bias"}
    h6, w6 = h.double().clone().requires_grad_(), w.double().clone().requires_grad_()
    ref, _, _ = linear_cross_entropy_ref(
        h6, w6, y, bias=None if b is None else b.double(), reduction=reduction, **o
    )
    ref.sum().backward()
    return rel_err(loss.detach(), ref.detach()), rel_err(hl.grad, h6.grad), rel_err(wl.grad, w6.grad)


# Every case at V = 1000; at V = 50257 (GPT-2's, odd) the plain and all-options ones.
BIG_V_CASES = [c for c in CASES if c[0] in ("plain", "all")]
MATRIX = [(v, *c) for v, cases in ((1000, CASES), (50257, BIG_V_CASES)) for c in cases]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 3, 117])
@pytest.mark.parametrize("v,opt,reduction,trainable", MATRIX)
def test_matches_float64_reference(impl, n, v, opt, reduction, trainable):
    opts = OPTIONS[opt]
    h, w, y, b = make_inputs(n, 64, v, bias=opts.get("bias", False), seed=n + v)
    got, want = run(IMPLS[impl], h, w, y, b, reduction, trainable, opts)
    for name in want:
        assert got[name].dtype in (torch.float32, w.dtype), name
        err = rel_err(got[name], want[name]) if want[name].norm() > 0 else float(got[name].abs().max())
        assert err < REL_ERR[torch.float32], f"{name}: {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opt", ["plain", "smooth", "softcap", "bias"])
def test_no_worse_than_torch_fp32(impl, opt):
    opts = OPTIONS[opt]
    h, w, y, b = make_inputs(117, 96, 5003, bias=opts.get("bias", False), seed=7)
    t_loss, t_dh, t_dw = torch_fp32_errors(h, w, y, b, "mean", opts)
    got, want = run(IMPLS[impl], h, w, y, b, "mean", True, opts, seed=3)
    assert rel_err(got["loss"], want["loss"]) <= 2 * t_loss + 1e-6
    assert rel_err(got["d_hidden"], want["d_hidden"]) <= 2 * t_dh + 1e-6
    assert rel_err(got["d_weight"], want["d_weight"]) <= 2 * t_dw + 1e-6


def test_float64_reference_is_exact():
    h, w, y, b = make_inputs(117, 64, 1000, dtype=torch.float64, bias=True)
    got, want = run({}, h, w, y, b, "mean", True, OPTIONS["all"])
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-12, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("trainable", [False, True])
def test_low_precision_inputs_accumulate_in_fp32(dtype, impl, trainable):
    h, w, y, b = make_inputs(117, 64, 3001, dtype=dtype, bias=True)
    got, want = run(IMPLS[impl], h, w, y, b, "mean", trainable, OPTIONS["smooth_zloss_bias"])
    assert got["loss"].dtype == torch.float32
    assert rel_err(got["loss"], want["loss"]) < REL_ERR[torch.float32] * 10  # fp32 logits of exact products
    for name in set(want) - {"loss"}:
        assert got[name].dtype == dtype
        assert rel_err(got[name], want[name]) < REL_ERR[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_single_pass_rescales_when_the_max_grows(dtype):
    # A bias rising by 60 nats along the vocabulary: each row's max moves past its reference (margin 16,
    # 8 for float16) several times over the chunks.
    h, w, y, _ = make_inputs(117, 64, 4000, dtype=dtype)
    b = torch.linspace(-30, 30, 4000, dtype=torch.float64).to(dtype)
    got, want = run({"impl": "chunked", "block_rows": 40, "chunk_cols": 300}, h, w, y, b, "mean", False, {})
    assert rel_err(got["loss"], want["loss"]) < 1e-5
    assert rel_err(got["d_hidden"], want["d_hidden"]) < REL_ERR[dtype]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("trainable", [False, True])
def test_gradcheck_float64(reduction, trainable):
    h, w, y, b = make_inputs(3, 5, 17, dtype=torch.float64, bias=True, ignore_every=0)
    y[1] = -100

    def fn(hh, ww, bb):
        return ops.linear_cross_entropy(
            hh, ww, y, bias=bb, reduction=reduction, label_smoothing=0.1, z_loss=0.01, softcap=3.0
        )

    args = (h.requires_grad_(), w.requires_grad_(trainable), b.requires_grad_(trainable))
    assert torch.autograd.gradcheck(fn, args)
    # The frozen single pass (no softcap with smoothing) through gradcheck too.
    assert torch.autograd.gradcheck(
        lambda hh: ops.linear_cross_entropy(
            hh, w.detach(), y, reduction="mean", z_loss=0.01, label_smoothing=0.1
        ),
        (h,),
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grads(impl, reduction):
    h, w, y, b = make_inputs(7, 32, 300, bias=True)
    y[:] = -100
    for trainable in (False, True):
        got, _ = run(IMPLS[impl], h, w, y, b, reduction, trainable, {})
        for name, t in got.items():
            assert not torch.isnan(t).any(), name
            assert torch.count_nonzero(t) == 0, name


@pytest.mark.parametrize("impl", IMPLS)
def test_stats_per_token_loss_and_hit(impl):
    h, w, y, b = make_inputs(117, 64, 2000, bias=True)
    y[3] = 1999  # the last vocabulary entry as a target
    loss, stats = lce(h, w, y, bias=b, return_stats=True, softcap=10.0, **IMPLS[impl])
    _, rows, logits = linear_cross_entropy_ref(h, w, y, bias=b, softcap=10.0)
    valid = y != -100
    assert int(stats.count) == int(valid.sum())
    assert rel_err(stats.token_loss, rows) < 1e-5
    assert not stats.token_loss[~valid].any() and not stats.hit[~valid].any()
    top2 = logits.topk(2, dim=-1).values
    clear = valid & ((top2[:, 0] - top2[:, 1]) > 1e-4)
    assert torch.equal(stats.hit[clear], (logits.argmax(-1) == y)[clear])
    assert 0 < int(stats.hit.sum()) < int(valid.sum())  # both outcomes occur
    assert float(loss) == pytest.approx(float(rows.sum() / valid.sum()), rel=1e-5)


def test_leading_dimensions_and_module():
    h, w, y, b = make_inputs(24, 32, 500, bias=True)
    h3, y3 = h.reshape(2, 12, 32), y.reshape(2, 12)
    module = nn.LinearCrossEntropyLoss(reduction="none", label_smoothing=0.05, return_stats=True)
    loss, stats = module(h3, w, y3, bias=b)
    assert loss.shape == (2, 12) and stats.hit.shape == (2, 12)
    flat = ops.linear_cross_entropy(h, w, y, bias=b, reduction="none", label_smoothing=0.05)
    torch.testing.assert_close(loss.reshape(-1), flat)
    assert "label_smoothing=0.05" in repr(module)
    rows = (y != -100).nonzero().squeeze(1)  # flattened token indices
    loss_rows, _ = module(h3, w, y3, bias=b, valid_rows=rows)
    torch.testing.assert_close(loss_rows, loss)


def test_second_backward_through_the_single_pass_recomputes():
    h, w, y, _ = make_inputs(30, 32, 500)
    hl = h.clone().requires_grad_()
    loss = ops.linear_cross_entropy(hl, w, y)
    (g1,) = torch.autograd.grad(loss, hl, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 2, hl)
    torch.testing.assert_close(g2, 2 * g1, rtol=1e-5, atol=1e-7)


def test_custom_ops_pass_opcheck_and_compile():
    h, w, y, b = make_inputs(9, 16, 70, bias=True)
    args = (h.requires_grad_(), w, b, y, None, -100, 0.1, 0.01, 0.0, "mean", True, "auto", 0, 0)
    torch.library.opcheck(torch.ops.kindred.linear_cross_entropy.default, args)
    lse = torch.rand(9, dtype=torch.float32) + 5
    coef = torch.rand(9, dtype=torch.float32)
    rows = (y != -100).nonzero().squeeze(1)
    bargs = (
        h.detach(),
        w,
        b,
        y,
        rows,
        lse,
        coef,
        -100,
        0.1,
        0.01,
        2.0,
        [True, True, True],
        "chunked",
        0,
        0,
        1.0,
    )
    torch.library.opcheck(torch.ops.kindred.linear_cross_entropy_backward.default, bargs)

    def step(hh, ww):
        return ops.linear_cross_entropy(hh, ww, y, bias=b, z_loss=0.01, softcap=4.0)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for trainable in (False, True):
        outs = []
        for fn in (step, compiled):
            hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(trainable)
            loss = fn(hh, ww)
            loss.backward()
            outs.append((loss.detach(), hh.grad, ww.grad))
        for a, c in zip(*outs, strict=True):
            if a is None:
                assert c is None
            else:
                torch.testing.assert_close(a, c)


def test_plan_stays_in_the_memory_budget():
    for single in (True, False):
        for n, d, v in [
            (16384, 4096, 262144),
            (8192, 5376, 262144),
            (16384, 3840, 262208),
            (4096, 8192, 151936),
        ]:
            t, c = _ops_loss.plan(n, d, v, single)
            extra = 4 * t * c + (4 * t * d) + 4 * t * 7 + 13 * n
            assert extra <= 64 * 2**20, (n, d, v, single, t, c)
            assert t >= 512 and c >= 4096  # large enough GEMMs for the tensor cores
    assert _ops_loss.plan(16384, 4096, 262144, True) == (1024, 8192)
    assert _ops_loss.plan(3, 64, 1000, True) == (3, 1000)


class _NewTensors(TorchDispatchMode):
    """Records the shape of every tensor an op allocates (in-place and out= ops write existing ones)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable and not func.is_view:
            self.shapes += [tuple(x.shape) for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_single_pass_backward_allocates_no_n_by_d_tensor(impl):
    # The op's extra outputs (per-token loss, lse, hit, dH) are not differentiated: with materialized grads
    # autograd would hand the backward an [N, D] tensor of zeros for the unused dH output.
    n, d = 64, 48
    h, w, y, _ = make_inputs(n, d, 300)
    hl = h.clone().requires_grad_()
    loss = lce(hl, w, y, **IMPLS[impl])
    rec = _NewTensors()
    with rec:
        loss.backward()
    big = [s for s in rec.shapes if math.prod(s) >= n * d]
    assert not big, big
    assert hl.grad is not None and hl.grad.any()


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_valid_rows_skip_ignored_tokens_with_the_same_results(trainable, reduction):
    h, w, y, b = make_inputs(117, 64, 3001, bias=True, ignore_every=3)
    rows = (y != -100).nonzero().squeeze(1)
    kw = {"impl": "chunked", "block_rows": 20, "chunk_cols": 1000}
    want, _ = run(kw, h, w, y, b, reduction, trainable, OPTIONS["all"])
    got, ref64 = run(kw, h, w, y, b, reduction, trainable, OPTIONS["all"], valid_rows=rows.int())
    for name in want:
        assert rel_err(got[name], want[name]) < REL_ERR[torch.float32], name
        assert rel_err(got[name], ref64[name]) < REL_ERR[torch.float32], name
    assert not got["d_hidden"][~(y != -100)].any()


def test_tokens_outside_valid_rows_count_as_ignored():
    h, w, y, _ = make_inputs(40, 32, 500, ignore_every=0)
    rows = torch.tensor([1, 5, 6, 20, 39])
    masked = torch.full_like(y, -100)
    masked[rows] = y[rows]
    for impl in IMPLS.values():
        hl = h.clone().requires_grad_()
        loss, stats = lce(hl, w, y, valid_rows=rows, return_stats=True, **impl)
        loss.backward()
        hm = h.clone().requires_grad_()
        want, want_stats = lce(hm, w, masked, return_stats=True, **impl)
        want.backward()
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(hl.grad, hm.grad)
        assert int(stats.count) == 5 and torch.equal(stats.hit, want_stats.hit)
        empty = lce(h, w, y, valid_rows=torch.tensor([], dtype=torch.int64), **impl)
        assert float(empty) == 0.0


def test_plan_reserves_the_gathered_rows():
    for single in (True, False):
        t, c = _ops_loss.plan(16384, 4096, 262144, single, gather_itemsize=2)
        assert 4 * t * c + (4 + 2) * t * 4096 <= 56 * 2**20 and t >= 512 and c >= 4096


BAD = [
    (lambda h, w, y: (h.int(), w, y), {}, "hidden must be float32"),
    (lambda h, w, y: (h, w[:, :-1], y), {}, "weight must be 2-D"),
    (lambda h, w, y: (h, w.double(), y), {}, "weight must have hidden's dtype"),
    (lambda h, w, y: (h, w, y.float()), {}, "targets must be an integer"),
    (lambda h, w, y: (h, w, y[:-1]), {}, "targets must have shape"),
    (lambda h, w, y: (h, w, y), {"reduction": "avg"}, "reduction must be"),
    (lambda h, w, y: (h, w, y), {"label_smoothing": 1.5}, "label_smoothing must be"),
    (lambda h, w, y: (h, w, y), {"z_loss": -1.0}, "z_loss must be"),
    (lambda h, w, y: (h, w, y), {"softcap": 0.0}, "softcap must be"),
    (lambda h, w, y: (h, w, y), {"bias": torch.zeros(3)}, "bias must be a tensor of shape"),
    (
        lambda h, w, y: (h, w, y),
        {"bias": torch.zeros(50, dtype=torch.float64)},
        "bias must have hidden's dtype",
    ),
    (lambda h, w, y: (h, w, y.index_fill(0, torch.tensor([2]), 50)), {}, r"targets\[2\] = 50 is outside"),
    (lambda h, w, y: (h, w, y.index_fill(0, torch.tensor([1]), -3)), {}, r"targets\[1\] = -3 is outside"),
    (lambda h, w, y: (h, w, y), {"impl": "fast"}, "impl must be"),
    (lambda h, w, y: (h.double(), w.double(), y), {"impl": "chunked"}, "float64 inputs run on the CPU"),
    (lambda h, w, y: (h, w, y), {"valid_rows": [0, 1]}, "valid_rows must be a CPU tensor"),
    (lambda h, w, y: (h, w, y), {"valid_rows": torch.tensor([[0]])}, "valid_rows must be a 1-D integer"),
    (lambda h, w, y: (h, w, y), {"valid_rows": torch.tensor([0.0])}, "valid_rows must be a 1-D integer"),
    (lambda h, w, y: (h, w, y), {"valid_rows": torch.tensor([2, 1])}, r"valid_rows must be increasing"),
    (lambda h, w, y: (h, w, y), {"valid_rows": torch.tensor([0, 4])}, r"indices in \[0, 4\)"),
    (lambda h, w, y: (h, w, y), {"valid_rows": torch.tensor([-1, 2])}, r"indices in \[0, 4\)"),
]


@pytest.mark.parametrize("make,kw,match", BAD)
def test_bad_inputs_raise_naming_the_argument(make, kw, match):
    h, w, y, _ = make_inputs(4, 8, 50, ignore_every=0)
    with pytest.raises(KindredValueError, match=match):
        lce(*make(h, w, y), **kw)


def test_core_checks_name_the_argument():
    logits = torch.randn(3, 10)
    state = torch.zeros(3, _core.LCE_STATE_COLS)
    y = torch.zeros(3, dtype=torch.int32)
    am = torch.zeros(3, dtype=torch.int32)
    opt = _core.LceOptions(-100, 0.0, 0.0, 0.0)
    v = view
    with pytest.raises(KindredValueError, match="the chunk"):
        _core.lce_chunk_update(v(logits), None, v(y), 5, 12, opt, v(state), v(am), None, None, 0)
    with pytest.raises(KindredValueError, match="exp_out must alias logits"):
        other = torch.empty(3, 10)
        _core.lce_chunk_update(
            v(logits), None, v(y), 0, 10, opt, v(state), v(am), v(other), v(torch.zeros(3, 4)), 0
        )
    with pytest.raises(KindredValueError, match="state must have shape"):
        _core.lce_chunk_update(v(logits), None, v(y), 0, 10, opt, v(state[:2]), v(am), None, None, 0)
    with pytest.raises(KindredValueError, match="label_smoothing must be"):
        _core.lce_chunk_update(
            v(logits), None, v(y), 0, 10, _core.LceOptions(-100, 2.0, 0, 0), v(state), v(am), None, None, 0
        )
    with pytest.raises(KindredValueError, match="single pass needs acc, weight, scale and d_hidden"):
        f = torch.zeros(3)
        _core.lce_finalize(
            v(state),
            v(am),
            v(y),
            10,
            opt,
            v(f),
            v(f.clone()),
            v(torch.zeros(3, dtype=torch.uint8)),
            v(torch.zeros(3, 4)),
            None,
            None,
            None,
            None,
            0,
        )
    with pytest.raises(KindredValueError, match="CPU reference"):
        h = torch.zeros(2, 4, device="meta")
        _core.linear_cross_entropy(
            _core.TensorView(8, "float32", [2, 4], [4, 1], "cuda", 0),
            v(torch.zeros(3, 4)),
            None,
            v(torch.zeros(2, dtype=torch.int32)),
            opt,
            v(torch.zeros(2)),
            v(torch.zeros(2)),
            v(torch.zeros(2, dtype=torch.uint8)),
        )
        del h


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_gemma_vocabulary(impl):
    # Gemma 3's 262,208 entries: not a multiple of 128.
    h, w, y, b = make_inputs(117, 32, 262208, bias=True, seed=3)
    kw = {"block_rows": 117, "chunk_cols": 65536} if impl == "chunked" else {}
    got, want = run({"impl": impl, **kw}, h, w, y, b, "mean", True, OPTIONS["all"])
    for name in want:
        assert rel_err(got[name], want[name]) < REL_ERR[torch.float32], name
