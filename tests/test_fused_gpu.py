"""The fused family on CUDA: each kernel against the CPU reference on the same inputs (poisoned outputs,
awkward shapes), the training ops rope and swiglu against eager autograd, stacked_decode against the layers
one by one, and generation through the fused decode step against the unfused one: same tokens, fewer
kernels, no re-capture."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from kindred import _core, models
from kindred._ops.adapter import view
from kindred._ops.fused import (
    add_rms_norm,
    rope,
    rope_qk_cache,
    rope_rotate,
    silu_mul,
    silu_mul_backward,
    swiglu,
)
from kindred.errors import KindredValueError
from kindred.generate import SamplingConfig, generate
from kindred.generate.runner import Engine, Runner
from kindred.models.rope import apply_rotary
from kindred.nn import Linear4bit, apply_lora
from kindred.nn.stacked import stacked_decode

from .test_fused import (
    assert_silu_grads_close,
    call_rope_rotate,
    eager_silu_grads,
    head_input,
    rand,
    rope_case,
    rope_inputs,
    rotary_tables,
    ulp_close,
)
from .test_generate_gpu import DECODE_CONFIG, prompts_of

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,d", [(1, 4096), (3, 1000), (117, 576), (16, 5120), (2, 16384)])
def test_add_rms_norm_cuda_equals_the_reference(dtype, m, d):
    wide = rand(m, d + 8, dtype=dtype, seed=1)
    x, r, w = wide[:, :d], rand(m, d, dtype=dtype, seed=2), rand(d, dtype=dtype, seed=3)
    want, want_s = add_rms_norm(x, r, w, 1e-6)
    xc, rc, wc = x.cuda(), r.cuda(), w.cuda()
    out = torch.full((m, d), float("nan"), dtype=dtype, device="cuda")
    s = torch.full((m, d), float("nan"), dtype=dtype, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    _core.add_rms_norm(view(xc), view(rc), view(wc), 1e-6, view(out), view(s), stream)
    torch.cuda.synchronize()
    assert torch.equal(s.cpu(), want_s)
    ulp_close(out.cpu(), want)


def test_add_rms_norm_cuda_refuses_a_row_past_its_registers():
    x = torch.ones(1, 16385, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(KindredValueError, match="x's features must be <= 16384 for the CUDA kernel"):
        add_rms_norm(x, x, x[0], 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n", [(1, 1), (3, 130), (64, 14336)])
def test_silu_mul_cuda_equals_the_reference(dtype, m, n):
    buf = rand(m, 2 * n + 16, dtype=dtype, seed=7)
    gate, up = buf[:, :n], buf[:, n + 16 :]
    got = silu_mul(gate.cuda(), up.cuda()).cpu()
    ulp_close(got, silu_mul(gate, up))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,h,hkv,d,rot,norm",
    [
        (1, 32, 8, 128, 128, True),
        (3, 6, 3, 32, 16, False),
        (17, 8, 1, 256, 128, True),
        (2, 2, 2, 10, 6, True),
    ],
)
def test_rope_qk_cache_cuda_equals_the_reference(dtype, b, h, hkv, d, rot, norm):
    case = rope_case(dtype, b, h, hkv, d, rot, norm, rows=b + 3, cap=40)
    cos, sin, cache_k, cache_v, slots = case[5:]
    want_q = rope_qk_cache(*case[:5], 1e-6, cos, sin, cache_k, cache_v, slots)
    cuda = [None if t is None else t.cuda() for t in case]
    got_q = rope_qk_cache(*cuda[:5], 1e-6, *cuda[5:])
    ulp_close(got_q.cpu(), want_q, per_row=True)
    kc, vc = cuda[7].cpu(), cuda[8].cpu()
    assert torch.equal(torch.isnan(kc), torch.isnan(cache_k))  # the same slots written, the rest poisoned
    assert torch.equal(vc.nan_to_num(), cache_v.nan_to_num())
    written = ~torch.isnan(cache_k)
    ulp_close(kc[written].view(-1, d), cache_k[written].view(-1, d), per_row=True)


def test_rope_qk_cache_cuda_skips_a_slot_outside_the_cache():
    case = [t.cuda() if t is not None else None for t in rope_case(torch.bfloat16, 2, 4, 2, 64, 64, True)]
    case[9] = torch.tensor([3, 9], device="cuda")  # capacity 9: row 1's keys have nowhere to go
    rope_qk_cache(*case[:5], 1e-6, *case[5:])
    kc = case[7].cpu()
    assert not torch.isnan(kc[0, :, 3]).any() and torch.isnan(kc[1]).all()


def cuda_copy(t: torch.Tensor) -> torch.Tensor:
    """t on CUDA with its strides and storage offset (so its alignment) kept."""
    flat = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device="cuda")
    return flat.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t)


def cuda_rope_rotate(x, cos, sin, inverse):
    """_core.rope_rotate on CUDA copies of the inputs into a NaN-poisoned output."""
    xc, cc, sc = cuda_copy(x), cuda_copy(cos), cuda_copy(sin)  # held: a view does not keep its tensor alive
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    _core.rope_rotate(view(xc), view(cc), view(sc), inverse, view(out), stream)
    return out.cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows,heads,d,rot",
    [
        (117, 3, 80, 80),
        (117, 3, 80, 64),
        (5, 8, 128, 96),
        (2, 3, 10, 6),
        (33, 4, 64, 2),
        (3, 40, 512, 512),  # more heads than a thread's batch of them
        (2, 5, 512, 2),  # scalar, more chunks than a block has threads
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "chunk", "padded_heads"])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_rotate_cuda_equals_the_reference(dtype, rows, heads, d, rot, layout, inverse):
    x = head_input(rows, heads, d, dtype, layout)
    cos, sin = rotary_tables(rows, rot, dtype, rotation=False)
    # the same roundings, no fma: bit for bit (vector path where aligned, the scalar one else)
    assert torch.equal(cuda_rope_rotate(x, cos, sin, inverse), call_rope_rotate(x, cos, sin, inverse))


def test_rope_rotate_cuda_takes_unaligned_views():
    """x, cos and sin one element past a 16-byte boundary: the scalar path."""
    x = rand(7, 2 * 4 * 64 + 1, dtype=torch.bfloat16, seed=1)[:, 1 : 1 + 4 * 64].unflatten(1, (4, 64))
    wide = rand(7, 2 * 64 + 2, dtype=torch.bfloat16, seed=2)
    cos, sin = wide[:, 1:65], wide[:, 66:130]
    for inverse in (False, True):
        assert torch.equal(cuda_rope_rotate(x, cos, sin, inverse), call_rope_rotate(x, cos, sin, inverse))


@pytest.mark.parametrize("rows,heads,kv_heads,d", [(8192, 32, 8, 128), (4096, 16, 8, 256)])
def test_rope_rotate_cuda_on_the_training_shapes(rows, heads, kv_heads, d):
    """q and k as column ranges of one [rows, (H + 2·Hkv)·D] projection output, bf16."""
    qkv = rand(rows, (heads + 2 * kv_heads) * d, dtype=torch.bfloat16, seed=3)
    cos, sin = rotary_tables(rows, d, torch.bfloat16)
    qc, cc, sc = qkv.cuda(), cos.cuda(), sin.cuda()
    for lo, h in ((0, heads), (heads * d, kv_heads)):
        x, xc = (t[:, lo : lo + h * d].unflatten(1, (h, d)) for t in (qkv, qc))
        for inverse in (False, True):
            assert torch.equal(rope_rotate(xc, cc, sc, inverse).cpu(), rope_rotate(x, cos, sin, inverse))


def test_rope_rotate_cuda_refuses_a_head_past_512():
    x = torch.ones(2, 1, 514, device="cuda")
    with pytest.raises(KindredValueError, match="x's head_dim must be <= 512 for the CUDA kernel"):
        rope_rotate(x, x[:, 0, :8], x[:, 0, :8])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,offset", [(1, 1, 0), (3, 130, 0), (117, 384, 1), (64, 14336, 0)])
def test_silu_mul_backward_cuda_equals_eager_and_the_reference(dtype, m, n, offset):
    """CUDA's expf and torch's CUDA silu_backward expression: eager autograd on CUDA bit for bit; the CPU
    reference (libm's exp) but for exp's last bit. ``offset`` shifts the views off 16 bytes (scalar path)."""
    buf = rand(m, 2 * n + 16 + offset, dtype=dtype, seed=7)
    gate, up = buf[:, offset : offset + n], buf[:, n + 16 + offset :]
    dout = rand(m, n + 8, dtype=dtype, seed=8)[:, offset : offset + n]
    g, u, d = (cuda_copy(t) for t in (gate, up, dout))
    dgate, dup = (torch.full((m, n), float("nan"), dtype=dtype, device="cuda") for _ in range(2))
    _core.silu_mul_backward(
        view(d), view(g), view(u), view(dgate), view(dup), torch.cuda.current_stream().cuda_stream
    )
    eager = eager_silu_grads(d, g, u)
    assert torch.equal(dgate, eager[0]) and torch.equal(dup, eager[1])
    assert_silu_grads_close((dgate.cpu(), dup.cpu()), silu_mul_backward(dout, gate, up), dout, gate, up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,t,h,d,rot,table_batch", [(2, 9, 3, 80, 64, 1), (1, 8192, 32, 128, 128, 1), (2, 33, 4, 256, 256, 2)]
)
def test_rope_on_cuda_equals_eager_autograd(dtype, b, t, h, d, rot, table_batch):
    x, cos, sin = (v.cuda() for v in rope_inputs(b, t, h, d, rot, dtype, table_batch))
    dy = rand(b, t, h, d, dtype=dtype, seed=5, device="cuda")
    outs = []
    for fn in (rope, apply_rotary):
        leaf = x.clone().requires_grad_()
        y = fn(leaf, cos, sin)
        outs.append((y, *torch.autograd.grad(y, leaf, dy)))
    for got, want in zip(*outs, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 96), (1, 4096, 14336), (3, 7, 130)])
def test_swiglu_on_cuda_equals_eager_autograd(dtype, shape):
    *lead, n = shape
    buf = rand(*lead, 2 * n, dtype=dtype, seed=9, device="cuda")  # gate and up: halves of one projection
    dout = rand(*shape, dtype=dtype, seed=10, device="cuda")
    outs = []
    for fn in (swiglu, lambda g, u: F.silu(g) * u):
        leaf = buf.clone().requires_grad_()
        y = fn(leaf[..., :n], leaf[..., n:])
        outs.append((y, *torch.autograd.grad(y, leaf, dout)))
    for got, want in zip(*outs, strict=True):
        assert torch.equal(got, want)


def stacked_model(quant):
    return models.from_config(DECODE_CONFIG, quant=quant, device="cuda", seed=1).eval()


@pytest.mark.parametrize("quant", ["nf4", "int4g"])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_stacked_decode_equals_the_layers_one_by_one(quant, rows):
    model = stacked_model(quant)
    attn = model.model.layers[0].self_attn
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = rand(rows, 1, DECODE_CONFIG["hidden_size"], dtype=torch.bfloat16, seed=3, device="cuda")
    with torch.no_grad():
        alone = [m(x) for m in layers]
        nbytes = sum(m._decode_data.numel() for m in layers)
        stacked = stacked_decode(layers, x)
        assert stacked is not None
        # the layers' own buffers became back-to-back views of one: nothing held twice
        bases = {m._decode_data._base.data_ptr() for m in layers}
        assert len(bases) == 1 and sum(m._decode_data.numel() for m in layers) == nbytes
        assert layers[0]._decode_data._base.numel() == nbytes
        again = [m(x) for m in layers]  # the layers' forwards read the views
    for a, s, g in zip(alone, stacked, again, strict=True):
        assert s.shape == a.shape and torch.equal(g, a)
        ulp_close(s.float().cpu(), a.float().cpu(), per_row=True)


def test_stacked_decode_with_lora_and_where_it_declines():
    model = stacked_model("int4g")
    apply_lora(model, ["gate_proj", "up_proj"], r=4, alpha=8)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        for p in (mlp.gate_proj.lora_B["default"].weight, mlp.up_proj.lora_B["default"].weight):
            p.copy_(torch.randn_like(p) * 0.3)
    x = rand(2, 1, DECODE_CONFIG["hidden_size"], dtype=torch.bfloat16, seed=5, device="cuda")
    with torch.no_grad():
        want = [mlp.gate_proj(x), mlp.up_proj(x)]
        got = stacked_decode((mlp.gate_proj, mlp.up_proj), x)
        for w, g in zip(want, got, strict=True):
            ulp_close(g.float().cpu(), w.float().cpu(), per_row=True)
        many = rand(17, DECODE_CONFIG["hidden_size"], dtype=torch.bfloat16, device="cuda")
        assert stacked_decode((mlp.gate_proj, mlp.up_proj), many) is None  # past the decode kernel's rows
        dense = torch.nn.Linear(256, 8, bias=False).cuda().bfloat16()
        assert isinstance(mlp.gate_proj.base_layer, Linear4bit)
        assert stacked_decode((mlp.gate_proj.base_layer, dense), x) is None  # a dense layer among them


@torch.no_grad()  # as generate() steps
def kernels_in_one_step(model, engine, prompts) -> int:
    runner = Runner(engine, prompts, 4)
    runner.prefill()
    tokens = torch.tensor([p[-1] for p in prompts], device="cuda")
    runner.step(tokens)  # builds the decode layouts and stacks them outside the profile
    torch.cuda.synchronize()
    with warnings.catch_warnings():  # the profiler's notices are not failures here
        warnings.simplefilter("ignore")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            runner.step(tokens)
            torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.parametrize("quant", ["nf4", "int4g"])
def test_fused_decode_equals_unfused_with_fewer_kernels(quant):
    model = stacked_model(quant)
    engine = Engine.for_model(model)
    prompts = prompts_of([5, 9, 3], seed=3, vocab=512)
    cfg = SamplingConfig(max_new_tokens=64)
    runs, kernels = {}, {}
    for fused in (False, True):
        engine.fused, engine.use_graphs = fused, False
        kernels[fused] = kernels_in_one_step(model, engine, prompts)
        engine.use_graphs = True
        runs[fused] = [c.tokens for c in generate(model, prompts, cfg)]
        steady = engine.captures
        assert [c.tokens for c in generate(model, prompts, cfg)] == runs[fused]
        assert engine.captures == steady
    assert runs[True] == runs[False]
    # per layer: 3 + 2 GEMVs -> 1 + 1, norms, rotary and the cache writes -> 3 kernels (2 layers here)
    assert kernels[True] <= 0.6 * kernels[False], kernels
