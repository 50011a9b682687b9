"""LoRA linear forward + backward (issue 5) at M = 8192 tokens against the frozen bf16 linear in the same run.

Baseline: the frozen bf16 linear, y = x·Wᵀ forward and dX = dY·W backward (two cuBLAS GEMMs, no dW). Rows:
kindred over a bf16 base (LoraLinear; its [W | s·B] workspace serves the backward), over NF4 and INT4g bases
(dequantized into the shared workspace in the forward and again in the backward), PEFT's LoRA Linear on the
bf16 base, and PEFT over bitsandbytes' NF4 Linear4bit when bitsandbytes imports. A step is y = layer(x) and
autograd.grad(y, [x, A, B], dY); dropout 0 (PEFT's default). Times are device times (harness.time_cuda);
the host time to issue one step is in the notes. Goals (issue 5): NF4 r=16 ≤ +15 % for
4096→14336 and 14336→4096, ≤ +25 % for 4096→4096; bf16 r=64 ≤ +20 %.
With KINDRED_PROFILE_DIR set, one step of kindred at r = 16 (bf16 and NF4 bases) and of the frozen linear
runs under torch.profiler per shape; the device time per kernel goes to $KINDRED_PROFILE_DIR/lora_profile.txt.
Run: python -m pytest benchmarks/bench_lora.py -m benchmark -s
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from kindred.nn import Linear4bit, LoraLinear

from .bench_e2e import profile_step
from .harness import append, fmt, host_ms, time_cuda
from .shapes import LINEARS, TRAIN_TOKENS, shape_id

RANKS = [16, 64]
GOALS = {("nf4", 16): {(4096, 4096): 25, (4096, 14336): 15, (14336, 4096): 15}, ("bf16", 64): 20}


def _goal(base: str, r: int, k: int, n: int) -> str:
    g = GOALS.get((base, r))
    pct = g.get((k, n)) if isinstance(g, dict) else g
    return "" if pct is None else f"goal <= +{pct}%"


def _peft_layer(base: nn.Module, r: int):
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear
    except ImportError:
        return None
    cfg = LoraConfig(r=r, lora_alpha=2 * r)
    return Linear(base, "default", cfg, r=r, lora_alpha=2 * r)


def _peft_bnb_layer(w: torch.Tensor, r: int):
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    except ImportError:
        return None
    n, k = w.shape
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    lin = lin.cuda()
    cfg = LoraConfig(r=r, lora_alpha=2 * r)
    return PeftLinear4bit(lin, "default", cfg, r=r, lora_alpha=2 * r).cuda()


def _lora_params(layer) -> list[torch.Tensor]:
    return [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def _profile(step, device, title) -> str:
    with warnings.catch_warnings():  # profiler notices must not fail the benchmark
        warnings.simplefilter("default")
        return profile_step(step, device, title)


def _measure(fn) -> tuple[float, float, float]:
    """(median device ms, peak MiB allocated beyond what was live before one call, host ms to issue it)."""
    ms = time_cuda(fn)
    host = host_ms(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    live = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - live) / 2**20, host


@pytest.mark.benchmark
@pytest.mark.parametrize("k,n", LINEARS[:3])
def test_lora_forward_backward(k, n):
    m = TRAIN_TOKENS
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    w = (torch.randn(n, k, device=dev) * 0.02).to(bf16)
    x = torch.randn(m, k, device=dev, dtype=bf16).requires_grad_()
    dy = torch.randn(m, n, device=dev, dtype=bf16)
    flops = 2 * 2 * m * k * n  # forward + dX GEMMs of the frozen base

    def frozen():
        y = x @ w.t()
        return y, dy @ w

    base_ms, base_mib, base_host = _measure(frozen)
    profile_dir = os.environ.get("KINDRED_PROFILE_DIR")
    profiles = [_profile(frozen, x.device, f"frozen bf16 {k}->{n}")] if profile_dir else []
    rows = [
        {
            "op": "linear_fwd_bwd",
            "impl": "torch-frozen-bf16",
            "shape": shape_id(k, n, M=m),
            "dtype": "bf16",
            "ms": fmt(base_ms),
            "tflops": fmt(flops / base_ms / 1e9),
            "peak_extra_mib": fmt(base_mib),
            "notes": f"x·Wᵀ fwd + dY·W bwd (cuBLAS); host {base_host:.2f} ms",
        }
    ]

    def step_fn(layer):
        params = [x, *_lora_params(layer)]

        def step():
            y = layer(x)
            return torch.autograd.grad(y, params, dy)

        return step

    def add(impl, base, r, layer, notes=""):
        ms, mib, host = _measure(step_fn(layer))
        goal = _goal(base, r, k, n) if impl == "kindred" else ""
        rows.append(
            {
                "op": "lora_fwd_bwd",
                "impl": impl,
                "shape": shape_id(k, n, M=m, r=r, base=base),
                "dtype": "bf16",
                "ms": fmt(ms),
                "baseline_impl": "torch-frozen-bf16",
                "baseline_ms": fmt(base_ms),
                "ratio_to_baseline": fmt(ms / base_ms),
                "tflops": fmt(flops / ms / 1e9),
                "peak_extra_mib": fmt(mib),
                "notes": "; ".join(
                    s for s in (f"+{100 * (ms / base_ms - 1):.1f}%", goal, f"host {host:.2f} ms", notes) if s
                ),
            }
        )

    linear = nn.Linear(k, n, bias=False, device=dev, dtype=bf16)
    with torch.no_grad():
        linear.weight.copy_(w)
    linear.weight.requires_grad_(False)  # a frozen base for PEFT too (kindred freezes it itself)
    for r in RANKS:
        for base in ("bf16", "nf4", "int4g"):
            src = copy.deepcopy(linear)
            layer_base = src if base == "bf16" else Linear4bit.from_linear(src, quant=base)
            layer = LoraLinear(layer_base, r=r, alpha=2 * r)
            with torch.no_grad():
                layer.lora_B["default"].weight.normal_(0, 0.02)
            add("kindred", base, r, layer)
            if profile_dir and r == 16 and base != "int4g":
                profiles.append(_profile(step_fn(layer), x.device, f"kindred {base} r=16 {k}->{n}"))
            del layer, layer_base, src
        peft_layer = _peft_layer(copy.deepcopy(linear), r)
        if peft_layer is not None:
            add("peft", "bf16", r, peft_layer)
            del peft_layer
        try:
            peft_bnb = _peft_bnb_layer(w, r)
        except Exception as e:  # a bitsandbytes build without CUDA kernels: say so in the CSV
            rows.append(
                {"op": "lora_fwd_bwd", "impl": "peft+bitsandbytes", "notes": f"unavailable: {e}"[:200]}
            )
            peft_bnb = None
        if peft_bnb is not None:
            add("peft+bitsandbytes", "nf4", r, peft_bnb)
            del peft_bnb
        torch.cuda.empty_cache()
    append("lora", rows)
    if profiles:
        with open(Path(profile_dir) / "lora_profile.txt", "a") as f:
            f.write("".join(profiles))
    for row in rows:
        print(
            f"{row['impl']:18s} {row.get('shape', ''):40s} {row.get('ms', ''):>8s} ms "
            f"{row.get('ratio_to_baseline', ''):>6s}x {row.get('peak_extra_mib', ''):>8s} MiB "
            f"{row.get('notes', '')}"
        )
    assert all(float(r["ms"]) > 0 for r in rows if r.get("ms"))
