"""Dequantize throughput of the 4-bit formats (issue 2) next to bitsandbytes and a device-to-device copy.

GB/s counts the bytes a dequantize must move: 0.5 B read + 2 B (bf16) written per weight. The copy row is
a bf16 clone of the same weight (2 B read + 2 B written per weight), the ceiling in the same run.
Run: python -m pytest benchmarks/bench_quant.py -m benchmark -s
"""

from __future__ import annotations

import pytest
import torch

from kindred import ops

from .harness import append, fmt, time_cuda
from .shapes import LINEARS, shape_id

DEQUANT_SHAPES = LINEARS[:3]


def _bnb():
    try:
        import bitsandbytes.functional as F
    except ImportError:
        return None
    return F


@pytest.mark.benchmark
@pytest.mark.parametrize("k,n", DEQUANT_SHAPES)
def test_dequantize(k, n):
    torch.manual_seed(0)
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    weights = n * k
    moved = weights * 2.5
    copy_ms = time_cuda(lambda: w.clone())
    copy_gbps = weights * 4 / copy_ms / 1e6
    rows = [
        {
            "op": "copy",
            "impl": "torch",
            "shape": shape_id(k, n),
            "dtype": "bf16",
            "ms": fmt(copy_ms),
            "gbps": fmt(copy_gbps),
            "notes": "d2d clone; bytes read + written",
        }
    ]
    F = _bnb()
    bnb_ms = {}
    if F is not None:
        for dq in (True, False):
            packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
            bnb_ms[dq] = time_cuda(lambda p=packed, s=state: F.dequantize_4bit(p, s))
            rows.append(
                {
                    "op": "dequantize_nf4",
                    "impl": "bitsandbytes",
                    "shape": shape_id(k, n, dq=int(dq)),
                    "dtype": "bf16",
                    "ms": fmt(bnb_ms[dq]),
                    "gbps": fmt(moved / bnb_ms[dq] / 1e6),
                    "baseline_impl": "copy",
                    "baseline_ms": fmt(copy_ms),
                    "ratio_to_baseline": fmt(copy_ms / bnb_ms[dq]),
                }
            )
    for dq in (True, False):
        q = ops.quantize_nf4(w, 64, dq)
        ms = time_cuda(lambda q=q: ops.dequantize_nf4(q))
        base = ("bitsandbytes", bnb_ms[dq]) if dq in bnb_ms else ("copy", copy_ms)
        rows.append(
            {
                "op": "dequantize_nf4",
                "impl": "kindred",
                "shape": shape_id(k, n, dq=int(dq)),
                "dtype": "bf16",
                "ms": fmt(ms),
                "gbps": fmt(moved / ms / 1e6),
                "baseline_impl": base[0],
                "baseline_ms": fmt(base[1]),
                "ratio_to_baseline": fmt(base[1] / ms),
                "notes": f"copy ceiling {copy_gbps:.0f} GB/s",
            }
        )
    qi = ops.quantize_int4g(w, 128)
    ms = time_cuda(lambda: ops.dequantize_int4g(qi))
    rows.append(
        {
            "op": "dequantize_int4g",
            "impl": "kindred",
            "shape": shape_id(k, n, g=128),
            "dtype": "bf16",
            "ms": fmt(ms),
            "gbps": fmt(moved / ms / 1e6),
            "baseline_impl": "copy",
            "baseline_ms": fmt(copy_ms),
            "ratio_to_baseline": fmt(copy_ms / ms),
        }
    )
    append("quant", rows)
    for r in rows:
        print(f"{r['op']:18s} {r['impl']:13s} {r['shape']:28s} {r['ms']:>8s} ms {r['gbps']:>7s} GB/s")
    nf4 = next(r for r in rows if r["impl"] == "kindred" and r["op"] == "dequantize_nf4")
    assert float(nf4["gbps"]) > 0
