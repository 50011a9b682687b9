"""The fused family (add_rms_norm, silu_mul, rope_qk_cache): the CPU reference against float64 and the
unfused torch ops it replaces, poisoned outputs, named errors; the decode path through them (engine.fused)
against the unfused one on every family that allows it. CUDA and stacked_decode: tests/test_fused_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kindred import _core, models
from kindred._ops.adapter import view
from kindred._ops.fused import add_rms_norm, rope_qk_cache, silu_mul
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
