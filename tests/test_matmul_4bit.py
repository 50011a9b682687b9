"""matmul_4bit: x · dequant(W)ᵀ against float64 on awkward shapes, autograd (gradcheck, dX), the CUDA
dequantize + GEMM path and the decode kernel against the references, the decode layout (repack round trip,
fragment order, its CPU reference), op registration and bad inputs."""

import numpy as np
import pytest
import torch

from kindred import _core, ops
from kindred._ops.adapter import stream, view
from kindred._ops.quant import core_weight
from kindred.errors import KindredValueError
from kindred.ops import DecodeWeight, matmul_4bit_decode, repack_decode, unpack_decode

from .helpers import randn
from .tolerances import REL_ERR, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = ["nf4", "nf4-dq", "int4g"]


def quantize(fmt, n, k, device="cpu", seed=0, block=64):
    w = randn((n, k), seed=seed, device=device) + (0.004 if fmt == "int4g" else 0.0)
    if fmt == "int4g":
        return ops.quantize_int4g(w, block)
    return ops.quantize_nf4(w, block, double_quant=fmt == "nf4-dq")


def reference(x, q, bias=None):
    y = x.double() @ q.dequantize(torch.float32).double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 256, 96), (3, 128, 100), (117, 192, 72)])
def test_cpu_matches_float64(fmt, dtype, m, k, n):
    q = quantize(fmt, n, k, block=64)
    x = randn((m, k), dtype, seed=m, scale=1.0)
    out = ops.matmul_4bit(x, q)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, reference(x, q)) < REL_ERR[dtype]


def test_leading_dims_bias_and_linear4bit():
    q = quantize("nf4-dq", 64, 256)
    x = randn((2, 5, 256), torch.bfloat16, seed=1, scale=1.0)
    bias = randn((64,), seed=2)
    out = ops.matmul_4bit(x, q, bias)
    assert out.shape == (2, 5, 64)
    assert rel_err(out, reference(x.reshape(-1, 256), q, bias).reshape(2, 5, 64)) < REL_ERR[torch.bfloat16]


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_float64(fmt):
    q = quantize(fmt, 24, 128)
    x = randn((3, 128), torch.float64, seed=5, scale=1.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.matmul_4bit(t, q), (x,))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dx_matches_float64(fmt):
    q = quantize(fmt, 48, 256)
    x = randn((7, 256), torch.float32, seed=6, scale=1.0).requires_grad_()
    dy = randn((7, 48), torch.float32, seed=7, scale=1.0)
    ops.matmul_4bit(x, q).backward(dy)
    ref = dy.double() @ q.dequantize(torch.float32).double()
    assert rel_err(x.grad, ref) < REL_ERR[torch.float32]


def test_custom_ops_pass_opcheck():
    q = quantize("nf4-dq", 32, 128)
    x = randn((3, 128), seed=3, scale=1.0)
    torch.library.opcheck(torch.ops.kindred.matmul_4bit.default, (x, *q.op_args(), 32))
    qi = quantize("int4g", 32, 128)
    torch.library.opcheck(torch.ops.kindred.matmul_4bit.default, (x, *qi.op_args(), 32))


def test_bad_inputs():
    q = quantize("nf4", 32, 128)
    with pytest.raises(KindredValueError, match=r"x must have shape \[\.\.\., 128\]"):
        ops.matmul_4bit(torch.ones(3, 64), q)
    with pytest.raises(KindredValueError, match="x must be float32"):
        ops.matmul_4bit(torch.ones(3, 128, dtype=torch.int32), q)
    with pytest.raises(KindredValueError, match="w must be a 2-D NF4Weight"):
        ops.matmul_4bit(torch.ones(3, 128), torch.ones(32, 128))
    with pytest.raises(KindredValueError, match="out must have shape"):
        out = torch.empty(3, 31)
        _core.matmul_4bit(view(torch.ones(3, 128)), core_weight(*q.op_args()), 32, view(out), 0)


# ---- CUDA ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 117, 1024])
def test_gemm_path_and_dx_on_cuda(fmt, m):
    q = quantize(fmt, 384, 512, device="cuda", seed=m)
    x = randn((m, 512), torch.bfloat16, seed=m, scale=1.0, device="cuda").requires_grad_()
    out = ops.matmul_4bit(x, q)
    assert rel_err(out, reference(x, q)) < REL_ERR[torch.bfloat16]
    dy = randn((m, 384), torch.bfloat16, seed=1, scale=1.0, device="cuda")
    out.backward(dy)
    assert rel_err(x.grad, dy.double() @ q.dequantize(torch.float32).double()) < REL_ERR[torch.bfloat16]


@pytest.mark.gpu
def test_cuda_bad_inputs():
    q = quantize("nf4", 32, 128, device="cuda")
    with pytest.raises(KindredValueError, match="x is on cpu but the weight is on cuda"):
        ops.matmul_4bit(torch.ones(1, 128), q)
    x = torch.ones(1, 128, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(1, 32, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(KindredValueError, match="canonical layout is the CPU path"):
        _core.matmul_4bit(view(x), core_weight(*q.op_args()), 32, view(out), 0)
    d = repack_decode(quantize("nf4", 32, 128, device="cuda"))
    with pytest.raises(KindredValueError, match="at most 16 rows"):
        matmul_4bit_decode(torch.ones(17, 128, dtype=torch.bfloat16, device="cuda"), d)
    with pytest.raises(KindredValueError, match="bf16 or f16"):
        matmul_4bit_decode(torch.ones(1, 128, device="cuda"), d)


# ---- decode layout (CPU) -------------------------------------------------------------------------------

# (format, N, K, block): N not a multiple of the 16-row padding, blocks below, at and above the 128 chunk.
LAYOUT_CASES = [
    ("nf4", 117, 256, 64),
    ("nf4-dq", 117, 384, 64),
    ("nf4", 40, 256, 32),
    ("nf4-dq", 24, 384, 256),
    ("nf4-dq", 32, 128, 4096),
    ("int4g", 117, 256, 128),
    ("int4g", 33, 384, 64),
    ("int4g", 16, 128, 32),
]


def expanded_absmax(q):
    """The f32 absmax of every block, double quantization expanded as dequantize_nf4 does (mul, then add)."""
    if not q.double_quant:
        return q.absmax
    idx = torch.arange(q.absmax.numel()) // 256
    return q.nested_code[q.absmax.long()] * q.nested_absmax[idx] + q.offset


@pytest.mark.parametrize("fmt,n,k,block", LAYOUT_CASES)
def test_repack_decode_round_trip_is_bit_exact(fmt, n, k, block):
    q = quantize(fmt, n, k, seed=n + k, block=block)
    d = repack_decode(q)
    assert d.data.dtype == torch.uint8 and d.shape == (n, k)
    back = unpack_decode(d)
    if fmt == "int4g":
        for name in ("packed", "scales", "zeros"):
            assert torch.equal(getattr(back, name), getattr(q, name)), name
    else:
        assert torch.equal(back.packed, q.packed.reshape(-1))
        assert torch.equal(back.absmax, expanded_absmax(q))
    assert torch.equal(back.dequantize(torch.float32), q.dequantize(torch.float32))


def layout_codes(d, n, k):
    """Every code read back from the decode layout by its documented formula (kindred/matmul_4bit.h),
    [n, k]."""
    data = d.data.numpy()
    periods = 128 // d.period
    record = periods * 8 * 4 if d.fmt == "nf4" else (periods * 8 * 3 + 15) // 16 * 16
    unit = 512 + record
    row, col = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    base = (row // 8 * (k // 128) + col // 128) * unit
    lane = 4 * (row % 8) + col % 32 // 8
    offset = base + 16 * lane + 4 * (col % 128 // 32)
    j = col % 8
    if d.fmt == "nf4":
        byte = data[offset + j // 2].astype(np.int64)
        return np.where(j % 2 == 0, byte >> 4, byte & 0xF)
    word = sum(data[offset + b].astype(np.int64) << (8 * b) for b in range(4))
    nibble = np.array([[0, 2, 4, 6, 1, 3, 5, 7].index(v) for v in range(8)])[j]
    return (word >> (4 * nibble)) & 0xF


@pytest.mark.parametrize("fmt", ["nf4", "int4g"])
def test_decode_layout_is_the_documented_fragment_order(fmt):
    n, k = 24, 256
    q = quantize(fmt, n, k, seed=4, block=64)
    codes = torch.arange(n * k).reshape(n, k).remainder(13).add(1).to(torch.uint8)  # no zero codes
    if fmt == "int4g":
        q = ops.Int4gWeight(codes[:, 0::2] | codes[:, 1::2] << 4, q.scales, q.zeros, 64, q.dtype)
    else:
        q = ops.NF4Weight(
            (codes[:, 0::2] << 4 | codes[:, 1::2]).reshape(-1),
            q.absmax,
            None,
            None,
            None,
            64,
            (n, k),
            q.dtype,
        )
    d = repack_decode(q)
    assert np.array_equal(layout_codes(d, n, k), codes.numpy())
    padding = layout_codes(d, 32, k)[n:]  # rows up to the 16-row padding hold code 0
    assert not padding.any()


@pytest.mark.parametrize("fmt,n,k,block", LAYOUT_CASES)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_decode_reference_matches_float64(fmt, n, k, block, m):
    q = quantize(fmt, n, k, seed=n, block=block)
    x = randn((m, k), torch.float32, seed=m, scale=1.0)
    out = matmul_4bit_decode(x, repack_decode(q))
    assert out.shape == (m, n)
    assert rel_err(out, reference(x, q)) < REL_ERR[torch.float32]


def test_decode_bad_inputs():
    with pytest.raises(KindredValueError, match="in_features % 128 == 0"):
        repack_decode(quantize("nf4", 8, 192))
    d = repack_decode(quantize("int4g", 16, 128, block=64))
    with pytest.raises(KindredValueError, match="inference-only"):
        matmul_4bit_decode(torch.ones(2, 128, requires_grad=True), d)
    with pytest.raises(KindredValueError, match=r"x must be a tensor of shape \[\.\.\., 128\]"):
        matmul_4bit_decode(torch.ones(2, 64), d)
    with pytest.raises(KindredValueError, match="data must have"):
        bad = DecodeWeight(d.data[:-16], d.fmt, d.shape, d.period, d.blocksize, d.dtype)
        matmul_4bit_decode(torch.ones(2, 128), bad)
    with pytest.raises(KindredValueError, match="period must be"):
        bad = DecodeWeight(d.data, d.fmt, d.shape, 48, d.blocksize, d.dtype)
        matmul_4bit_decode(torch.ones(2, 128), bad)


def test_decode_op_passes_opcheck():
    d = repack_decode(quantize("nf4-dq", 40, 256))
    x = randn((3, 256), seed=3, scale=1.0)
    torch.library.opcheck(torch.ops.kindred.matmul_4bit_decode.default, (x, d.data, 0, 40, 256, 64))


# ---- decode layout (CUDA) ------------------------------------------------------------------------------


def _decode_into(x, d, out):
    data, fmt, n, k, period = d.op_args()
    _core.matmul_4bit_decode(view(x), _core.DecodeWeight(view(data), fmt, n, k, period), view(out), stream(x))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize(
    "k,n,block",
    [
        (128, 8, 64),
        (384, 117, 128),
        (4096, 1000, 64),
        (1024, 4100, 32),
        (512, 300, 256),
        (128, 4100, 32),  # one chunk per tile pair
        (14336, 64, 64),  # long K, few tile pairs: 8-way split-K in every block
    ],
)
def test_decode_layout_kernel_matches_reference(fmt, dtype, m, k, n, block):
    if fmt == "int4g" and block > 128:
        block = 128
    q = quantize(fmt, n, k, device="cuda", seed=k + n, block=block)
    d = repack_decode(q)
    assert d.data.is_cuda
    x = randn((m, k), dtype, seed=m, scale=1.0, device="cuda")
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")  # poisoned
    _decode_into(x, d, out)
    torch.cuda.synchronize()
    assert rel_err(out, reference(x, q)) < REL_ERR[dtype]
    gemm = ops.matmul_4bit(x, q)  # without the layout: dequantize + cuBLAS
    assert rel_err(out, gemm.double()) < REL_ERR[torch.bfloat16]
    again = torch.full_like(out, float("nan"))
    _decode_into(x, d, again)
    assert torch.equal(again, out)  # deterministic: split-K sums in a fixed order
    assert torch.equal(ops.matmul_4bit(x, q, decode=d), out)


@pytest.mark.gpu
def test_decode_layout_matches_its_cpu_reference_on_a_large_layer():
    q = quantize("nf4-dq", 14336, 4096, device="cuda", seed=1)
    d = repack_decode(q)
    x = randn((16, 4096), torch.bfloat16, seed=2, scale=1.0, device="cuda")
    out = torch.full((16, 14336), float("nan"), dtype=torch.bfloat16, device="cuda")
    _decode_into(x, d, out)
    ref = matmul_4bit_decode(x.float().cpu(), d.to("cpu"))
    assert rel_err(out, ref) < REL_ERR[torch.bfloat16]


@pytest.mark.gpu
def test_decode_dispatch_keeps_gradients_and_large_m_on_the_old_paths():
    q = quantize("int4g", 256, 512, device="cuda", block=128)
    d = repack_decode(q)
    x = randn((4, 512), torch.bfloat16, seed=3, scale=1.0, device="cuda").requires_grad_()
    y = ops.matmul_4bit(x, q, decode=d)  # needs dX: dequantize + GEMM with autograd
    y.backward(torch.ones_like(y))
    assert x.grad is not None
    big = randn((40, 512), torch.bfloat16, seed=4, scale=1.0, device="cuda")
    assert torch.equal(ops.matmul_4bit(big, q, decode=d), ops.matmul_4bit(big, q))
