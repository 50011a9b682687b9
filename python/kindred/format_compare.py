"""``kindred formats``: one linear layer of a real model shape quantized to each 4-bit format, with its
weight and output error, size and quantize / dequantize time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ._core import cuda_compiled
from .nn import Linear4bit


def _device(name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _timed(fn, device) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) * 1e3


def compare_formats(
    device: str = "auto",
    in_features: int = 4096,
    out_features: int = 4096,
    tokens: int = 64,
    seed: int = 0,
    out: str | Path = "kindred-formats",
) -> dict:
    """Quantize one linear layer of a real model shape to each 4-bit format; print error, size and speed and
    write them to ``out``/quantize.json (returned as a dict)."""
    device = _device(device)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    k, n = in_features, out_features
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        # Trained weights are near-Gaussian with a few large outliers per row; imitate both.
        w = torch.randn(n, k, generator=gen) * k**-0.5
        w[:, torch.randint(0, k, (8,), generator=gen)] *= 8
        linear.weight.copy_(w)
    linear = linear.to(device=device, dtype=torch.bfloat16)
    x = torch.randn(tokens, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    weight = linear.weight.detach()
    ref = x.double() @ weight.double().t()
    Linear4bit.from_linear(
        torch.nn.Linear(256, 64).to(device), quant="nf4"
    )  # warm-up: op registration, threads
    console = Console(width=max(Console().width, 110))
    console.print(
        f"kindred demo: one {k}→{n} linear layer (bf16, {n * k / 1e6:.1f}M weights) on {device}; "
        f"CUDA kernels compiled: {cuda_compiled()}"
    )
    table = Table(
        "format", "bits/weight", "MiB", "weight rel. err", "output rel. err", "quantize ms", "dequant ms"
    )
    rows = []
    for name, kwargs in (
        ("NF4 + double quant", {"quant": "nf4"}),
        ("NF4", {"quant": "nf4", "double_quant": False}),
        ("INT4 g128 (AWQ)", {"quant": "int4g"}),
    ):
        layer, q_ms = _timed(lambda kw=kwargs: Linear4bit.from_linear(linear, **kw), device)
        w_hat, dq_ms = _timed(layer.dequantize, device)
        w_err = float((w_hat.double() - weight.double()).norm() / weight.double().norm())
        y_err = float((layer(x).double() - ref).norm() / ref.norm())
        q = layer.quantized
        row = {
            "format": name,
            "bits_per_weight": q.bits_per_weight,
            "mib": q.nbytes / 2**20,
            "weight_rel_err": w_err,
            "output_rel_err": y_err,
            "quantize_ms": q_ms,
            "dequantize_ms": dq_ms,
        }
        rows.append(row)
        table.add_row(
            name,
            f"{q.bits_per_weight:.3f}",
            f"{row['mib']:.1f}",
            f"{w_err:.4f}",
            f"{y_err:.4f}",
            f"{q_ms:.1f}",
            f"{dq_ms:.2f}",
        )
    y_bf16 = float((torch.nn.functional.linear(x, weight).double() - ref).norm() / ref.norm())
    table.add_row("bf16 (unquantized)", "16", f"{n * k * 2 / 2**20:.1f}", "0", f"{y_bf16:.4f}", "", "")
    console.print(table)
    result = {"device": str(device), "shape": [n, k], "tokens": tokens, "formats": rows}
    (out_dir / "quantize.json").write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out_dir / 'quantize.json'}")
    return result
