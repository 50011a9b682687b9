"""The norm family on CUDA: each kernel against the CPU reference on the same inputs (poisoned outputs,
awkward shapes, the training step's hidden and per-head q/k shapes, strided and misaligned rows, w in T or
float32), the row limit, and the autograd function on CUDA against eager torch."""

from __future__ import annotations

import pytest
import torch

from kindred import _core
from kindred._ops.adapter import view
from kindred._ops.norm import rms_norm, rms_norm_backward, rms_norm_forward
from kindred.errors import KindredValueError

from .test_norm import EPS, grad_scale, rand, torch_norm, ulp_close
from .tolerances import rel_err

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# D across the kernels' shapes: half a warp per row (<= 16 units of 16 bytes), a warp (<= 512), a block.
AWKWARD = [(1, 1), (3, 64), (117, 80), (5, 128), (7, 256), (9, 512), (33, 520), (3, 1000), (117, 4099)]
# The training step's: hidden norms (Llama-8B-like, Gemma-3-12B) and per-head q/k norms (D = 128, 256).
TRAINING = [(8192, 4096), (4096, 3840), (262144, 128), (65536, 256)]


def layout(x: torch.Tensor, how: str) -> torch.Tensor:
    """x itself, its copy as a column range of a wider buffer (rows still 16-byte aligned), or one shifted by
    one element (no row 16-byte aligned: the scalar kernels)."""
    if how == "contiguous":
        return x
    m, d = x.shape
    start = 0 if how == "strided" else 1
    wide = torch.full((m, d + 16), float("nan"), dtype=x.dtype, device=x.device)
    wide[:, start : start + d] = x
    return wide[:, start : start + d]


def run_core(x, w, offset, dout):
    """(out, rstd, dx) of the core on x's device, every output poisoned with NaN first."""
    m, d = x.shape
    out = torch.full((m, d), float("nan"), dtype=x.dtype, device=x.device)
    rstd = torch.full((m,), float("nan"), dtype=torch.float32, device=x.device)
    dx = torch.full((m, d), float("nan"), dtype=x.dtype, device=x.device)
    s = torch.cuda.current_stream().cuda_stream if x.is_cuda else 0
    _core.rms_norm(view(x), view(w), EPS, offset, view(out), view(rstd), s)
    _core.rms_norm_backward(view(dout), view(x), view(w), view(rstd), offset, view(dx), s)
    return out, rstd, dx


def check_against_the_reference(m, d, dtype, w_f32, offset, how):
    x, dout = rand(m, d, dtype=dtype, seed=1), rand(m, d, dtype=dtype, seed=2)
    w = rand(d, dtype=torch.float32 if w_f32 else dtype, seed=3)
    want_out, want_rstd = rms_norm_forward(x, w, EPS, offset)
    want_dx = rms_norm_backward(dout, x, w, want_rstd, offset)
    xc, doutc = layout(x.cuda(), how), layout(dout.cuda(), how)
    out, rstd, dx = (t.cpu() for t in run_core(xc, w.cuda(), offset, doutc))
    ulp_close(out, want_out)
    ulp_close(rstd, want_rstd)
    ulp_close(dx, want_dx, grad_scale(dout, x, w, offset))


@pytest.mark.parametrize("how", ["contiguous", "strided", "misaligned"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("w_f32", [False, True], ids=["w_T", "w_f32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,d", AWKWARD)
def test_rms_norm_cuda_equals_the_reference(m, d, dtype, w_f32, offset, how):
    check_against_the_reference(m, d, dtype, w_f32, offset, how)


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,d", [*TRAINING, (2, 16384)])
def test_rms_norm_cuda_equals_the_reference_on_training_shapes(m, d, dtype, offset):
    check_against_the_reference(m, d, dtype, offset == 1.0 and dtype != torch.float32, offset, "contiguous")


def test_rms_norm_cuda_refuses_a_row_past_its_registers():
    x = torch.ones(2, 16385, dtype=torch.bfloat16, device="cuda")
    match = "x's features must be <= 16384 for the CUDA kernel"
    with pytest.raises(KindredValueError, match=match):
        rms_norm_forward(x, x[0], EPS)
    with pytest.raises(KindredValueError, match=match):
        rms_norm_backward(x, x, x[0], torch.ones(2, device="cuda"))


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("d", [128, 3840])
def test_rms_norm_autograd_on_cuda_equals_eager_torch(d, offset):
    """bf16 q/k-norm-shaped [B, T, H, D] (a view of the projection's output) and hidden [B, T, D] inputs: out
    and dx within one ulp of eager torch's, dw (when w requires grad) against the CPU path."""
    shape = (2, 48, 4, d) if d == 128 else (2, 48, d)
    proj = rand(2 * 48, 4 * d if d == 128 else d, dtype=torch.bfloat16, seed=4, device="cuda")
    x0 = proj.view(shape)
    dout = rand(*shape, dtype=torch.bfloat16, seed=5, device="cuda")
    w = rand(d, dtype=torch.bfloat16, seed=6, device="cuda")
    got_x, want_x = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    got_w = w.clone().requires_grad_()
    got = rms_norm(got_x, got_w, EPS, offset)
    want = torch_norm(want_x, w, offset)
    ulp_close(got.cpu(), want.cpu())
    got.backward(dout)
    want.backward(dout)
    scale = grad_scale(dout.cpu(), x0.cpu(), w.cpu(), offset)
    ulp_close(got_x.grad.cpu(), want_x.grad.cpu(), scale)
    cpu_x, cpu_w = x0.cpu().requires_grad_(), w.cpu().requires_grad_()
    rms_norm(cpu_x, cpu_w, EPS, offset).backward(dout.cpu())
    assert rel_err(got_w.grad, cpu_w.grad) < 1e-2
