"""matmul_4bit: x · dequant(W)ᵀ against float64 on awkward shapes, autograd (gradcheck, dX), the CUDA decode
kernel and the dequantize + GEMM path against the CPU reference, op registration and bad inputs."""

import pytest
import torch

from kindred import _core, _ops, ops
from kindred.errors import KindredValueError

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
    args = (x, q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset, 64, 32)
    torch.library.opcheck(torch.ops.kindred.matmul_4bit_nf4.default, args)
    qi = quantize("int4g", 32, 128)
    torch.library.opcheck(
        torch.ops.kindred.matmul_4bit_int4g.default, (x, qi.packed, qi.scales, qi.zeros, 64)
    )


def test_bad_inputs():
    q = quantize("nf4", 32, 128)
    with pytest.raises(KindredValueError, match=r"x must have shape \[\.\.\., 128\]"):
        ops.matmul_4bit(torch.ones(3, 64), q)
    with pytest.raises(KindredValueError, match="x must be float32"):
        ops.matmul_4bit(torch.ones(3, 128, dtype=torch.int32), q)
    with pytest.raises(KindredValueError, match="w must be a 2-D NF4Weight"):
        ops.matmul_4bit(torch.ones(3, 128), torch.ones(32, 128))
    with pytest.raises(KindredValueError, match="out must have shape"):
        _core.matmul_4bit_nf4(
            _ops.view(torch.ones(3, 128)),
            _ops.view(q.packed),
            _ops.view(q.absmax),
            None,
            None,
            None,
            64,
            32,
            _ops.view(torch.empty(3, 31)),
            0,
        )


# ---- CUDA ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("k,n,block", [(128, 8, 64), (384, 100, 128), (4096, 1000, 64), (1024, 4100, 32)])
def test_decode_kernel_matches_reference(fmt, dtype, m, k, n, block):
    q = quantize(fmt, n, k, device="cuda", seed=k + n, block=block)
    x = randn((m, k), dtype, seed=m, scale=1.0, device="cuda")
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")  # poisoned
    if fmt == "int4g":
        _core.matmul_4bit_int4g(
            _ops.view(x),
            _ops.view(q.packed),
            _ops.view(q.scales),
            _ops.view(q.zeros),
            block,
            _ops.view(out),
            _ops.stream(x),
        )
    else:
        _core.matmul_4bit_nf4(
            _ops.view(x),
            _ops.view(q.packed),
            _ops.view(q.absmax),
            _ops.opt_view(q.nested_absmax, "nested_absmax"),
            _ops.opt_view(q.nested_code, "nested_code"),
            _ops.opt_view(q.offset, "offset"),
            block,
            n,
            _ops.view(out),
            _ops.stream(x),
        )
    torch.cuda.synchronize()
    assert rel_err(out, reference(x, q)) < REL_ERR[dtype]
    assert torch.equal(ops.matmul_4bit(x, q), out)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [17, 117, 1024])
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
    with pytest.raises(KindredValueError, match="in_features % 128"):
        x = torch.ones(1, 64, dtype=torch.bfloat16, device="cuda")
        q64 = quantize("nf4", 32, 64, device="cuda")
        _core.matmul_4bit_nf4(
            _ops.view(x),
            _ops.view(q64.packed),
            _ops.view(q64.absmax),
            None,
            None,
            None,
            64,
            32,
            _ops.view(torch.empty(1, 32, dtype=torch.bfloat16, device="cuda")),
            0,
        )
