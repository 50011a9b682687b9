"""Causal attention backends on the training step's shapes (issue 19), forward and forward + backward.

Each case is one micro-batch as the trainer hands it to the model: B rows flattened into one packed row of
documents (``cu_seqlens``), q/k/v as [1, T, H, D] projections, the heads transposed as the layers do.
Implementations: kindred's "flex" (FlexAttention with the document block mask, today's default on CUDA),
"varlen" (torch's varlen flash attention over the documents' offsets, no mask, no transposes), and where
every document is a whole row, SDPA causal per row with each of its flash, cuDNN and memory-efficient kernels.
tflops counts the causal work: 2·Σ len²·H·D forward, 2.5× that backward. Rows to results/attention.csv,
ratios to flex. Run: python -m pytest benchmarks/bench_attention.py -m benchmark -s
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kindred.models.attention import AttentionContext, attend, document_ids, varlen_attend

from .harness import append, fmt, time_cuda

# name -> (document lengths, heads, kv heads, head dim, sliding window)
CASES = {
    "qwen3-8b-4x2048": ([2048] * 4, 32, 8, 128, None),
    "qwen3-8b-packed": ([1500, 700, 2400, 300, 1200, 900, 1192], 32, 8, 128, None),
    "gemma3-12b-1x4096": ([4096], 16, 8, 256, None),
    "gemma3-12b-1x4096-window": ([4096], 16, 8, 256, 1024),
    "qwen3-8b-1x16384": ([16384], 32, 8, 128, None),
}
SDPA_KERNELS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}
REPS, WARMUP = 20, 3


def _causal_flops(lengths: list[int], heads: int, dim: int, window: int | None) -> float:
    pairs = sum(
        n * (n + 1) / 2 if window is None else sum(min(i + 1, window) for i in range(n)) for n in lengths
    )
    return 4.0 * pairs * heads * dim


def _inputs(lengths, heads, kv_heads, dim):
    t = sum(lengths)
    g = torch.Generator(device="cuda").manual_seed(0)

    def make(h):
        return torch.randn(1, t, h, dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return make(heads), make(kv_heads), make(kv_heads), cu


def _impls(lengths, heads, kv_heads, dim, window):
    t, scale = sum(lengths), dim**-0.5
    q, k, v, cu = _inputs(lengths, heads, kv_heads, dim)
    flex_ctx = AttentionContext(t, 0, q.device, document_ids(cu, t), "flex", cu_seqlens=cu)
    impls = {
        "flex": lambda: attend(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), flex_ctx, window, scale
        ),
        "varlen": lambda: varlen_attend(q[0], k[0], v[0], cu, max(lengths), window, scale),
    }
    if len(set(lengths)) == 1:  # whole rows: causal SDPA over [B, H, len, D]
        b, n = len(lengths), lengths[0]

        def rows(x):
            return x.view(b, n, x.shape[2], dim).transpose(1, 2)

        for name, kernel in SDPA_KERNELS.items():
            if window is not None:
                continue

            def run(kernel=kernel):
                with sdpa_kernel([kernel]):
                    return F.scaled_dot_product_attention(
                        rows(q), rows(k), rows(v), is_causal=True, scale=scale, enable_gqa=heads != kv_heads
                    )

            impls[name] = run
    return impls, (q, k, v)


@pytest.mark.benchmark
@pytest.mark.parametrize("case", list(CASES))
def test_attention_backends(case):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lengths, heads, kv_heads, dim, window = CASES[case]
    impls, (q, k, v) = _impls(lengths, heads, kv_heads, dim, window)
    flops = _causal_flops(lengths, heads, dim, window)
    grad = torch.randn(1, sum(lengths), heads, dim, device="cuda", dtype=torch.bfloat16)
    reference = impls["flex"]().transpose(1, 2).float()
    times, rows = {}, []
    for name, fn in impls.items():
        try:
            out = fn()
        except RuntimeError as e:  # a kernel that refuses the shape (GQA, head dim) is reported, not timed
            print(f"{case} {name}: not run ({str(e).splitlines()[0][:120]})")
            continue
        out = out.transpose(1, 2).reshape(grad.shape) if out.dim() == 4 and out.shape[1] == heads else out
        err = (out.reshape(grad.shape).float() - reference).abs().max().item()
        assert err < 0.05, f"{name} differs from flex by {err}"

        def fwd_bwd(fn=fn):
            o = fn()
            o = o.transpose(1, 2) if o.dim() == 4 and o.shape[1] == heads else o
            torch.autograd.grad(o.reshape(grad.shape), (q, k, v), grad)

        with torch.no_grad():
            fwd = time_cuda(fn, reps=REPS, warmup=WARMUP)
        both = time_cuda(fwd_bwd, reps=REPS, warmup=WARMUP)
        times[name] = (fwd, both)
        docs = f"docs={len(lengths)}x{max(lengths)},T={sum(lengths)}"
        shape = f"{docs},H={heads},Hkv={kv_heads},D={dim},w={window}"
        for op, ms, work in (("forward", fwd, flops), ("forward_backward", both, 3.5 * flops)):
            base = times["flex"][0 if op == "forward" else 1] if "flex" in times else None
            rows.append(
                {
                    "op": op,
                    "impl": name,
                    "shape": shape,
                    "dtype": "bf16",
                    "ms": fmt(ms),
                    "baseline_impl": "flex",
                    "baseline_ms": fmt(base) if base else "",
                    "ratio_to_baseline": fmt(ms / base) if base else "",
                    "tflops": fmt(work / ms / 1e9),
                    "notes": f"max |out - flex| {err:.3g}",
                }
            )
        rate = 3.5 * flops / both / 1e9
        print(f"{case} {name}: forward {fwd:.3f} ms, forward+backward {both:.3f} ms ({rate:.0f} TFLOP/s)")
    append("attention", rows)
    assert "flex" in times and "varlen" in times
