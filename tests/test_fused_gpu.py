"""The fused family on CUDA: each kernel against the CPU reference on the same inputs (poisoned outputs,
awkward shapes), stacked_decode against the layers one by one, and generation through the fused decode
step against the unfused one: same tokens, fewer kernels, no re-capture."""

from __future__ import annotations

import warnings

import pytest
import torch

from kindred import _core, models
from kindred._ops.adapter import view
from kindred._ops.fused import add_rms_norm, rope_qk_cache, silu_mul
from kindred.errors import KindredValueError
from kindred.generate import SamplingConfig, generate
from kindred.generate.runner import Engine, Runner
from kindred.nn import Linear4bit, apply_lora
from kindred.nn.stacked import stacked_decode

from .test_fused import rand, rope_case, ulp_close
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
