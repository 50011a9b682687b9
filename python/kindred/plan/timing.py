"""Time estimators: training FLOPs per token and tokens/s, training time for a dataset, decode tokens/s.

Training tokens/s = GPU dense bf16 rate × efficiency / FLOPs per token. The efficiency comes from
kindred's own benchmark results (benchmarks/results/*.csv, rows with op=train_step) when there are any,
otherwise from the end-to-end runs measured on an H100 in ../shared/reference/anchors-measured.md;
every estimate says which.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from ..errors import KindredValueError
from .catalogue import ModelSpec
from .gpus import GPU, GPUS, get_gpu
from .memory import METHODS, check_sequence, kv_cache_bytes, lora_params, normalize_format, weight_bits

# End-to-end QLoRA/LoRA steps measured on one H100 SXM (anchors-measured.md, "End-to-end QLoRA step"):
# transformers + PEFT (+ bitsandbytes NF4), r=16 on all 7 projections, gradient checkpointing, SDPA attention.
ANCHOR_RUNS = (
    {
        "model": "qwen3-8b",
        "method": "qlora",
        "seq": 2048,
        "batch": 4,
        "tokens_per_s": 4997,
        "gpu": "h100-sxm",
    },
    {
        "model": "qwen3-8b",
        "method": "qlora",
        "seq": 2048,
        "batch": 4,
        "tokens_per_s": 5124,
        "gpu": "h100-sxm",
    },
    {"model": "qwen3-8b", "method": "lora", "seq": 2048, "batch": 4, "tokens_per_s": 5319, "gpu": "h100-sxm"},
    {
        "model": "gemma-3-12b",
        "method": "qlora",
        "seq": 4096,
        "batch": 1,
        "tokens_per_s": 2432,
        "gpu": "h100-sxm",
    },
    {
        "model": "gemma-3-12b",
        "method": "qlora",
        "seq": 4096,
        "batch": 1,
        "tokens_per_s": 2408,
        "gpu": "h100-sxm",
    },
)
ANCHOR_SOURCE = "default from H100 end-to-end anchors (transformers+PEFT+bitsandbytes, anchors-measured.md)"
# Decode reads every active weight once per token. Fractions of the H100's 3.35 TB/s datasheet bandwidth
# reached
# by one batch-1 GEMV of 4096×14336 (anchors-measured.md): bf16 cuBLAS 2.82 TB/s, int4 tinygemm 1.78 TB/s on
# the
# int4 bytes. Upper bounds for a whole model: attention, norms and launches add time.
DECODE_BW_EFFICIENCY = {"bf16": 2.82 / 3.35, "quantized": 1.78 / 3.35}


def _ctx_mean(seq: int, window: int | None) -> float:
    """Mean number of keys a query attends to under a causal (optionally windowed) mask, positions 1..seq."""
    if not window or seq <= window:
        return (seq + 1) / 2
    return (window * (window + 1) / 2 + (seq - window) * window) / seq


def train_flops_per_token(
    spec: ModelSpec, method: str = "qlora", seq: int = 2048, rank: int = 16, grad_checkpointing: bool = True
) -> dict[str, float]:
    """FLOPs per trained token by phase: forward, recomputation (gradient checkpointing), backward.

    Matmuls cost 2 FLOPs per weight per token (routed experts only for MoE); attention 4·q_dim per attended
    key (QKᵀ and PV) over the mean causal (or windowed) context. Backward: a frozen base needs only dX
    (1× forward); full fine-tuning adds dW (2×); attention backward is 2× its forward; LoRA 2×.
    Recomputation repeats the decoder layers' forward, not the lm_head's.
    """
    if method not in METHODS:
        raise KindredValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    check_sequence(spec, seq)
    counts = spec.param_counts()
    linear = (
        counts["attention"]
        + counts["router"]
        + counts["mlp"] * (spec.experts_per_token / spec.experts if spec.is_moe else 1)
    )
    dense = 2 * linear
    head = 2 * spec.hidden * spec.vocab
    full_layers = spec.layers - spec.sliding_layers
    attn = (
        4
        * spec.q_dim
        * (full_layers * _ctx_mean(seq, None) + spec.sliding_layers * _ctx_mean(seq, spec.sliding_window))
    )
    lora = 0 if method == "full" else 2 * lora_params(spec, rank)
    base_bwd = 2 if method == "full" else 1
    forward = dense + head + attn + lora
    recompute = (dense + attn + lora) if grad_checkpointing else 0
    backward = base_bwd * (dense + head) + 2 * attn + 2 * lora
    return {
        "forward": forward,
        "recompute": recompute,
        "backward": backward,
        "total": forward + recompute + backward,
    }


def _shape_fields(shape: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in shape.split(",") if "=" in part)


def load_train_runs(results_dir: str | Path, spec_lookup) -> list[dict]:
    """End-to-end rows (op=train_step) of benchmarks/results/*.csv whose shape names a known model.

    Convention for the e2e benchmark's `shape` cell: `model=<catalogue id>,method=qlora,seq=2048,batch=4,r=16`
    (+ `fused=1` for a fused loss, `ckpt=0` without gradient checkpointing). Rows that do not name a known
    model or GPU are skipped.
    """
    runs = []
    for path in sorted(Path(results_dir).glob("*.csv")):
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("op") != "train_step" or not row.get("tokens_per_s"):
                    continue
                fields = _shape_fields(row.get("shape", ""))
                try:
                    spec = spec_lookup(fields["model"])
                    gpu = get_gpu(row["gpu"])
                    run = {
                        "model": spec.id,
                        "method": fields.get("method", "qlora"),
                        "seq": int(fields["seq"]),
                        "batch": int(fields.get("batch", 1)),
                        "rank": int(fields.get("r", 16)),
                        "fused_loss": fields.get("fused", "0") == "1",
                        "grad_checkpointing": fields.get("ckpt", "1") == "1",
                        "gpu": gpu.id,
                        "tokens_per_s": float(row["tokens_per_s"]),
                        "commit": row.get("commit", ""),
                        "source": path.name,
                    }
                except (KeyError, ValueError, KindredValueError):
                    continue
                if row.get("peak_extra_mib"):
                    run["measured_gib"] = float(row["peak_extra_mib"]) / 1024
                runs.append(run)
    return runs


def run_efficiency(run: dict, spec_lookup) -> float:
    """Achieved fraction of the GPU's dense bf16 rate in one measured run."""
    spec = spec_lookup(run["model"])
    flops = train_flops_per_token(
        spec, run["method"], run["seq"], run.get("rank", 16), run.get("grad_checkpointing", True)
    )["total"]
    return run["tokens_per_s"] * flops / (GPUS[run["gpu"]].bf16_tflops * 1e12)


def training_efficiency(method: str, spec_lookup, results_dir: str | Path | None = None) -> tuple[float, str]:
    """(efficiency, where it came from): median over kindred's measured runs of `method` when there are any,
    else over the anchors of `method` (full fine-tuning, never measured, borrows LoRA's: an estimate)."""
    runs = load_train_runs(results_dir, spec_lookup) if results_dir and Path(results_dir).is_dir() else []
    own = [r for r in runs if r["method"] == method]
    if own:
        commits = sorted({r["commit"] for r in own if r["commit"]})
        return (
            statistics.median(run_efficiency(r, spec_lookup) for r in own),
            f"calibrated from {len(own)} train_step rows in {results_dir} "
            f"(commits {', '.join(commits) or '?'})",
        )
    anchor_method = "lora" if method == "full" else method
    anchors = [r for r in ANCHOR_RUNS if r["method"] == anchor_method]
    note = ANCHOR_SOURCE + (
        "; full fine-tuning uses the LoRA runs' efficiency (estimate)" if method == "full" else ""
    )
    return statistics.median(run_efficiency(r, spec_lookup) for r in anchors), note


def train_tokens_per_s(
    spec: ModelSpec,
    gpu: GPU,
    efficiency: float,
    method: str = "qlora",
    seq: int = 2048,
    rank: int = 16,
    grad_checkpointing: bool = True,
) -> float | None:
    """Trained tokens per second on `gpu` (None when the GPU's bf16 rate is unknown, e.g. --vram)."""
    if gpu.bf16_tflops is None:
        return None
    flops = train_flops_per_token(spec, method, seq, rank, grad_checkpointing)["total"]
    return gpu.bf16_tflops * 1e12 * efficiency / flops


def training_seconds(dataset_tokens: int, epochs: float, tokens_per_s: float) -> float:
    """Time to train on `dataset_tokens` (the token report's total) for `epochs`."""
    if dataset_tokens <= 0 or epochs <= 0:
        raise KindredValueError(
            f"dataset tokens and epochs must be positive, got {dataset_tokens} and {epochs}"
        )
    return dataset_tokens * epochs / tokens_per_s


def decode_bytes_per_token(spec: ModelSpec, fmt: str, context: int) -> float:
    """Bytes read per decoded token at batch 1: active weights (one embedding row aside) + the KV cache."""
    bits = weight_bits(spec, fmt)
    head = bits["embedding"] if spec.tied_embeddings else bits["lm_head"]
    experts = bits["experts"] * (spec.experts_per_token / spec.experts if spec.is_moe else 0)
    return (head + bits["layers"] + experts + bits["norms"]) / 8 + kv_cache_bytes(spec, context)


def decode_tokens_per_s(spec: ModelSpec, gpu: GPU, fmt: str = "Q4_K_M", context: int = 4096) -> float | None:
    """Batch-1 decode rate from bytes per token over the GPU's bandwidth × measured GEMV efficiency."""
    if gpu.bandwidth_gbs is None:
        return None
    fmt = normalize_format(fmt)
    eff = DECODE_BW_EFFICIENCY["bf16" if fmt == "BF16" else "quantized"]
    return gpu.bandwidth_gbs * 1e9 * eff / decode_bytes_per_token(spec, fmt, context)
