"""matmul_4bit (issue 4): decode (M = 1, 4, 16) and training forward + dX (M = 8192), NF4 and INT4g, next to
torch bf16 (cuBLAS) and bitsandbytes' matmul_4bit in the same run. Results: results/matmul_4bit.csv.

Decode is timed two ways: one call with L2 flushed before it (device time; launch overhead hidden behind a
queued sleep), and CUDA-graph replay of 8 calls over 8 rotated weight copies (so weights never sit in L2),
reported per call. GB/s counts the bytes that must move: the 4-bit weight with its scales, x and y.
kindred-*-decode is the streaming kernel over the repacked layout (what Linear4bit runs for M <= 16);
kindred-nf4-gemm / kindred-int4g-gemm the canonical layouts without it (dequantize + one cuBLAS GEMM).
Rows before the layout refactor named kindred-nf4 / kindred-int4g measured a first decode kernel that read
the canonical layouts (removed; benchmarks/notes/matmul_4bit_decode.md).
With KINDRED_PROFILE_DIR set, each decode implementation also runs once between cudaProfilerStart/Stop
(for `ncu --profile-from-start off`), and the list of those calls is written there.
Run: python -m pytest benchmarks/bench_matmul_4bit.py -m benchmark -s
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kindred import ops

from .harness import append, fmt, time_cuda
from .shapes import DECODE_BATCHES, LINEARS, TRAIN_TOKENS, shape_id

COPIES = 8


def _bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError:
        return None, None
    return bnb, F


def graph_ms(calls) -> float | None:
    """Per-call device time of replaying a graph that runs every callable in ``calls`` once."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for c in calls:  # warm-up outside capture (allocator pools, lazy init)
                c()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
    except RuntimeError:
        return None
    return time_cuda(graph.replay, reps=20, flush=False) / len(calls)


def weight_bytes(q) -> int:
    return q.data.numel() if hasattr(q, "data") else q.nbytes


def profile_once(label: str, call) -> None:
    """With KINDRED_PROFILE_DIR set: one call of ``call`` inside a profiler range, named in calls.txt."""
    folder = os.environ.get("KINDRED_PROFILE_DIR")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    with open(Path(folder) / "calls.txt", "a") as f:
        f.write(label + "\n")


@pytest.mark.benchmark
@pytest.mark.parametrize("k,n", LINEARS)
def test_decode(k, n):
    torch.manual_seed(0)
    bnb, F = _bnb()
    dense = [(torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16) for _ in range(COPIES)]
    formats = {
        "nf4": [ops.quantize_nf4(w, 64, True) for w in dense],
        "int4g": [ops.quantize_int4g(w, 128) for w in dense],
    }
    decoded = {name: [ops.repack_decode(q) for q in qs] for name, qs in formats.items()}
    bnb_states = (
        [F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for w in dense]
        if F
        else []
    )
    rows = []
    for m in DECODE_BATCHES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        io_bytes = (m * k + m * n) * 2
        bf16_single = time_cuda(lambda x=x: x @ dense[0].t())
        bf16_graph = graph_ms([lambda w=w, x=x: x @ w.t() for w in dense])
        base = {"single": bf16_single, "graph": bf16_graph}
        for mode, ms in base.items():
            rows.append(
                {
                    "op": "matmul_4bit",
                    "impl": "torch-bf16",
                    "shape": shape_id(k, n, M=m),
                    "dtype": "bf16",
                    "ms": fmt(ms),
                    "gbps": fmt((n * k * 2 + io_bytes) / ms / 1e6) if ms else "",
                    "notes": f"decode {mode}",
                }
            )
        candidates = [
            (f"kindred-{name}-gemm", qs, lambda q, x=x: ops.matmul_4bit(x, q)) for name, qs in formats.items()
        ]
        candidates += [
            (f"kindred-{name}-decode", ds, lambda d, x=x: ops.matmul_4bit_decode(x, d))
            for name, ds in decoded.items()
        ]
        if bnb is not None:
            candidates.append(
                (
                    "bitsandbytes-nf4",
                    bnb_states,
                    lambda s, x=x: bnb.matmul_4bit(x, s[0].t(), quant_state=s[1]),
                )
            )
        for impl, weights, call in candidates:
            single = time_cuda(lambda c=call, w=weights[0]: c(w))
            profile_once(f"{impl} {shape_id(k, n, M=m)}", lambda c=call, w=weights[0]: c(w))
            graph = graph_ms([lambda c=call, w=w: c(w) for w in weights])
            moved = (
                weight_bytes(weights[0]) if impl.startswith("kindred") else n * k * 0.5 + n * k / 64
            ) + io_bytes
            for mode, ms in (("single", single), ("graph", graph)):
                if ms is None:
                    continue
                b = base[mode]
                rows.append(
                    {
                        "op": "matmul_4bit",
                        "impl": impl,
                        "shape": shape_id(k, n, M=m),
                        "dtype": "bf16",
                        "ms": fmt(ms),
                        "baseline_impl": "torch-bf16",
                        "baseline_ms": fmt(b),
                        "ratio_to_baseline": fmt(b / ms) if b else "",
                        "gbps": fmt(moved / ms / 1e6),
                        "notes": f"decode {mode}"
                        + ("; L2 flushed" if mode == "single" else f"; {COPIES} rotated weight copies"),
                    }
                )
    append("matmul_4bit", rows)
    for r in rows:
        print(
            f"{r['impl']:18s} {r['shape']:26s} {r['notes'][:14]:14s} {r['ms']:>9s} ms "
            f"x{r.get('ratio_to_baseline') or '-':>6s} {r['gbps']:>7s} GB/s"
        )
    assert all(float(r["ms"]) > 0 for r in rows)


@pytest.mark.benchmark
@pytest.mark.parametrize("k,n", LINEARS[:3])
def test_train_forward_dx(k, n):
    torch.manual_seed(0)
    bnb, F = _bnb()
    m = TRAIN_TOKENS
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * 2 * m * n * k

    def step(fn):
        def run():
            x.grad = None
            fn().backward(dy)

        return run

    impls = {"torch-bf16": step(lambda: x @ w.t())}
    q_nf4, q_int4g = ops.quantize_nf4(w, 64, True), ops.quantize_int4g(w, 128)
    impls["kindred-nf4"] = step(lambda: ops.matmul_4bit(x, q_nf4))
    impls["kindred-int4g"] = step(lambda: ops.matmul_4bit(x, q_int4g))
    if bnb is not None:
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        impls["bitsandbytes-nf4"] = step(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state))
    times = {name: time_cuda(fn, reps=20) for name, fn in impls.items()}
    base = times["torch-bf16"]
    rows = [
        {
            "op": "matmul_4bit_fwd_dx",
            "impl": name,
            "shape": shape_id(k, n, M=m),
            "dtype": "bf16",
            "ms": fmt(ms),
            "baseline_impl": "torch-bf16",
            "baseline_ms": fmt(base),
            "ratio_to_baseline": fmt(base / ms),
            "tflops": fmt(flops / ms / 1e9),
            "notes": f"forward + dX; {100 * (ms / base - 1):+.1f}% vs bf16",
        }
        for name, ms in times.items()
    ]
    append("matmul_4bit", rows)
    for r in rows:
        print(f"{r['impl']:18s} {r['shape']:26s} {r['ms']:>8s} ms {r['tflops']:>6s} TFLOP/s {r['notes']}")
    assert all(float(r["ms"]) > 0 for r in rows)
