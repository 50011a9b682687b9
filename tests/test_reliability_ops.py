"""The ops refuse the bad calls that used to give silent wrong results (issue 15, "Silent wrong results"):
each case names the argument. The CUDA variants (device mismatch, non-contiguous, wrong dtype, NaN) must
raise before any kernel launches; they run on a GPU machine (``-m gpu``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import kindred
from kindred.ops import (
    count_trainable,
    dequantize_int4g,
    int4g_from_awq,
    int4g_to_awq,
    linear_cross_entropy,
    lora_linear,
    matmul_4bit,
    pack_bfd,
    quantize_int4g,
    quantize_nf4,
)

from .helpers import randn


@pytest.fixture
def int4g():
    return quantize_int4g(randn((24, 128), seed=3), 64)


def test_linear_cross_entropy_checks_int64_targets_before_narrowing():
    hidden, weight = randn((3, 16), seed=1, scale=1.0), randn((5, 16), seed=2, scale=1.0)
    targets = torch.tensor([0, 1, 2**32 + 3])  # its low 32 bits are class 3
    with pytest.raises(kindred.KindredValueError, match=r"targets\[2\] = 4294967299 is outside \[0, 5\)"):
        linear_cross_entropy(hidden, weight, targets)
    with pytest.raises(kindred.KindredValueError, match=r"targets\[0\] = -4294967396 is outside"):
        linear_cross_entropy(hidden, weight, torch.tensor([-(2**32) - 100, 1, 2]))  # low bits: -100


def test_narrowed_targets_never_become_a_class_or_the_ignore_index():
    from kindred._ops.loss import _targets32

    wide = torch.tensor([2**32 + 3, -(2**32) - 100, 2**40, 7, -100])
    got = _targets32(wide, -100).tolist()
    assert got[3:] == [7, -100] and all(v == 2**31 - 1 for v in got[:3])
    assert _targets32(wide, 2**31 - 1).tolist()[:3] == [-(2**31)] * 3


def test_pack_bfd_refuses_lengths_int32_cannot_hold():
    with pytest.raises(kindred.KindredValueError, match=r"lengths\[1\] = 4294967301 does not fit in int32"):
        pack_bfd(np.array([3, 2**32 + 5, 4], dtype=np.int64), 16)
    with pytest.raises(kindred.KindredValueError, match=r"lengths\[0\] = -4294967295"):
        pack_bfd(torch.tensor([-(2**32) + 1]), 16)
    with pytest.raises(kindred.KindredValueError, match="lengths must hold integers, got dtype float64"):
        pack_bfd(np.array([3.5]), 16)
    row, start, rows = pack_bfd(np.array([5, 3, 8], dtype=np.int64), 8)  # int64 that fits still packs
    assert rows == 2 and sorted(zip(row.tolist(), start.tolist(), strict=True)) == [(0, 0), (1, 0), (1, 5)]


def test_dequantize_int4g_refuses_zero_points_above_15(int4g):
    bad = int4g.zeros.clone()
    bad[1, 0] = 16
    message = r"zeros\[2\] = 16: a zero point must be in \[0, 15\]"
    with pytest.raises(kindred.KindredValueError, match=message):
        dequantize_int4g(dataclasses.replace(int4g, zeros=bad))
    torch.testing.assert_close(dequantize_int4g(int4g), int4g.dequantize())


def test_count_trainable_refuses_tensors_on_different_devices():
    labels = torch.ones(16, dtype=torch.int64)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    # Before the check, cu_seqlens on another device made the core read uninitialized memory.
    with pytest.raises(kindred.KindredValueError, match="cu_seqlens is on meta but labels are on cpu"):
        count_trainable(labels, cu.to("meta"))
    assert count_trainable(labels, cu).per_sequence.tolist() == [8, 8]


@pytest.mark.parametrize("shape", [(1,), (24, 24), (23,), ()])
def test_matmul_4bit_checks_the_bias_shape(int4g, shape):
    x = randn((24, 128), seed=5, scale=1.0)  # 24 rows: a [24, 24] bias would broadcast without the check
    with pytest.raises(kindred.KindredValueError, match=r"bias must have shape \[24\] \(out_features\)"):
        matmul_4bit(x, int4g, bias=randn(shape, seed=6) if shape else torch.tensor(1.0))
    bias = randn((24,), seed=6)
    torch.testing.assert_close(matmul_4bit(x, int4g, bias), x @ int4g.dequantize().T + bias)


@pytest.mark.parametrize("group_size", [0, -64, 48, 64.0, "64"])
def test_int4g_from_awq_checks_group_size(int4g, group_size):
    awq = int4g_to_awq(int4g)
    with pytest.raises(kindred.KindredValueError, match="group_size must be one of 32, 64, 128"):
        int4g_from_awq(awq["qweight"], awq["qzeros"], awq["scales"], group_size=group_size)


@pytest.mark.parametrize("scaling", ["2", None, True, float("inf"), [2.0]])
def test_lora_linear_checks_scaling(scaling):
    x, w = randn((3, 32), seed=1, scale=1.0), randn((16, 32), seed=2)
    a, b = randn((4, 32), seed=3), randn((16, 4), seed=4)
    with pytest.raises(kindred.KindredValueError, match="scaling must be finite"):
        lora_linear(x, w, a, b, scaling)


@pytest.mark.parametrize("shape", [(4, 0), (0, 128)])
def test_quantize_of_an_empty_tensor_says_empty(shape):
    with pytest.raises(kindred.KindredValueError, match=r"weight must be non-empty, got shape"):
        quantize_int4g(torch.empty(shape))
    with pytest.raises(kindred.KindredValueError, match=r"weight must be non-empty"):
        quantize_nf4(torch.empty(shape))


# ---- CUDA: every argument check fires before a kernel launches ---------------------------------------------
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")


def _raises_before_launch(fn, match: str) -> None:
    """``fn`` raises a KindredError matching ``match`` and leaves the device without an error (a kernel that
    ran with bad arguments would have failed asynchronously; synchronize surfaces that)."""
    with pytest.raises(kindred.KindredError, match=match):
        fn()
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_linear_cross_entropy_argument_checks():
    dev = _cuda()
    h, w = randn((6, 64), torch.bfloat16, dev, 1, 1.0), randn((40, 64), torch.bfloat16, dev, 2, 1.0)
    y = torch.randint(0, 40, (6,), device=dev)
    _raises_before_launch(lambda: linear_cross_entropy(h, w.cpu(), y), "weight must be on hidden's device")
    _raises_before_launch(lambda: linear_cross_entropy(h, w, y.cpu()), "targets must be on hidden's device")
    _raises_before_launch(lambda: linear_cross_entropy(h, w.float(), y), "weight must have hidden's dtype")
    _raises_before_launch(lambda: linear_cross_entropy(h, w, y.float()), "targets must be an integer tensor")
    # 2³² + 3 is not class 3 on the GPU either: its loss is NaN (an out-of-range target without a host sync).
    wide = y.clone()
    wide[2] = 2**32 + 3
    loss = linear_cross_entropy(h, w, wide, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()


@pytest.mark.gpu
def test_cuda_matmul_4bit_and_quant_argument_checks():
    dev = _cuda()
    w = randn((64, 128), torch.bfloat16, dev, 1)
    q = quantize_int4g(w, 64)
    x = randn((5, 128), torch.bfloat16, dev, 2, 1.0)
    _raises_before_launch(lambda: matmul_4bit(x.cpu(), q), "x is on cpu but the weight is on cuda")
    _raises_before_launch(lambda: matmul_4bit(x, q, bias=torch.zeros(64)), "bias is on cpu but x is on cuda")
    _raises_before_launch(lambda: matmul_4bit(x, q, bias=torch.zeros(1, device=dev)), r"bias must have shape")
    _raises_before_launch(lambda: matmul_4bit(x.int(), q), "x must be float32, float16, bfloat16")
    _raises_before_launch(lambda: quantize_int4g(w.t()), "weight must be contiguous")
    _raises_before_launch(lambda: quantize_int4g(w.int()), "weight must be float32, float16 or bfloat16")
    nan = w.clone()
    nan[3, 7] = float("nan")
    _raises_before_launch(lambda: quantize_int4g(nan), r"weight holds a non-finite value at flat index 391")
    _raises_before_launch(lambda: quantize_nf4(nan), r"weight holds a non-finite value at flat index 391")
    bad = q.zeros.clone()
    bad[0, 1] = 99
    _raises_before_launch(lambda: dequantize_int4g(dataclasses.replace(q, zeros=bad)), r"zeros\[1\] = 99")
    _raises_before_launch(lambda: quantize_int4g(torch.empty(4, 0, device=dev)), "weight must be non-empty")


@pytest.mark.gpu
def test_cuda_lora_and_tokens_argument_checks():
    dev = _cuda()
    x, w = randn((3, 64), torch.bfloat16, dev, 1, 1.0), randn((32, 64), torch.bfloat16, dev, 2)
    a, b = randn((4, 64), torch.bfloat16, dev, 3), randn((32, 4), torch.bfloat16, dev, 4)
    _raises_before_launch(lambda: lora_linear(x, w, a.cpu(), b, 2.0), "A is on cpu but x is on cuda")
    _raises_before_launch(lambda: lora_linear(x, w, a.float(), b, 2.0), "A has dtype torch.float32")
    _raises_before_launch(lambda: lora_linear(x, w.cpu(), a, b, 2.0), "base is on cpu but x is on cuda")
    _raises_before_launch(lambda: lora_linear(x, w, a, b, "2"), "scaling must be finite")
    labels = torch.ones(16, dtype=torch.int64, device=dev)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    _raises_before_launch(lambda: count_trainable(labels, cu), "cu_seqlens is on cpu but labels are on cuda")
    assert count_trainable(labels, cu.to(dev)).total.item() == 16
