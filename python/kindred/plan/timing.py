"""Time estimators: work per trained token, tokens/s per trainer, training time, decode tokens/s.

A step's time per trained token is modelled as three kinds of work, each at its own calibrated rate:

    t = a · GEMM FLOPs / peak + b · attention FLOPs / peak + c · memory traffic / bandwidth

with the GPU's dense bf16 rate (peak) and memory bandwidth from gpus.json. GEMM FLOPs: 2 per weight per
token for the forward (routed experts only), the lm_head on the trained tokens (kindred's loss skips the
others), LoRA's rank-r GEMMs; the backward of a frozen base needs dX only (1× the forward), full
fine-tuning dW too (2×), LoRA 2×; recomputation repeats the layers' forward (the policy's share).
Attention: 4·q_dim FLOPs per attended key over the mean causal (or windowed) context, 2× in the backward.
Memory traffic: the layers' saved activations written, re-written when recomputed, read and matched by
gradients (3 + recompute share passes), plus each step's dequantization of the 4-bit base (written in bf16
once per forward, recomputation and backward) spread over the step's tokens.

a, b, c ≥ their physical bounds (a, b ≥ 1: no more than the peak rate) are fitted per trainer by least
squares on the relative error of that trainer's measured steps only (calibrate.py; kindred's rows never mix
with Unsloth's or transformers'); with few rows the fit uses fewer terms (b = a, c = 0). The packaged
calibration.json is generated from benchmarks/results by ``python -m benchmarks.bench_plan --report``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from ..errors import KindredValueError
from .catalogue import ModelSpec, get_model
from .gpus import GPU
from .memory import METHODS, check_sequence, kv_cache_bytes, normalize_format, weight_bits
from .training import get_policy, layer_activations, lora_shapes, quantized_bytes

CALIBRATION = Path(__file__).with_name("calibration.json")
FEATURES = ("gemm", "attn", "traffic")


def _ctx_mean(seq: int, window: int | None) -> float:
    """Mean number of keys a query attends to under a causal (optionally windowed) mask, positions 1..seq."""
    if not window or seq <= window:
        return (seq + 1) / 2
    return (window * (window + 1) / 2 + (seq - window) * window) / seq


def _lora_params(spec: ModelSpec, rank: int) -> int:
    return sum(a + b for a, b in lora_shapes(spec, rank))


def train_flops_per_token(
    spec: ModelSpec,
    method: str = "qlora",
    seq: int = 2048,
    rank: int = 16,
    policy: str = "full",
    trained_share: float = 1.0,
) -> dict[str, float]:
    """FLOPs per token of one step by phase (forward, recompute, backward) and kind (gemm, attn).

    ``trained_share``: the fraction of tokens with a label (kindred's loss computes the lm_head only there).
    """
    if method not in METHODS:
        raise KindredValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    check_sequence(spec, seq)
    if not 0 < trained_share <= 1:
        raise KindredValueError(f"trained_share must be in (0, 1], got {trained_share}")
    share = get_policy(policy).recompute_share
    counts = spec.param_counts()
    routed = spec.experts_per_token / spec.experts if spec.is_moe else 1
    dense = 2 * (counts["attention"] + counts["router"] + counts["mlp"] * routed)
    head = 2 * spec.hidden * spec.vocab * trained_share
    full_layers = spec.layers - spec.sliding_layers
    attn = (
        4
        * spec.q_dim
        * (full_layers * _ctx_mean(seq, None) + spec.sliding_layers * _ctx_mean(seq, spec.sliding_window))
    )
    lora = 0 if method == "full" else 2 * _lora_params(spec, rank)
    base_bwd = 2 if method == "full" else 1
    gemm = {
        "forward": dense + head + lora,
        "recompute": share * (dense + lora),
        "backward": base_bwd * (dense + head) + 2 * lora,
    }
    att = {"forward": attn, "recompute": share * attn, "backward": 2 * attn}
    out = {k: gemm[k] + att[k] for k in gemm}
    out["gemm"], out["attn"] = sum(gemm.values()), sum(att.values())
    out["total"] = out["gemm"] + out["attn"]
    return out


def step_features(
    spec: ModelSpec,
    method: str = "qlora",
    seq: int = 2048,
    batch: int = 1,
    rank: int = 16,
    policy: str = "full",
    trained_share: float = 1.0,
) -> dict[str, float]:
    """Work per token of one step: GEMM FLOPs, attention FLOPs and memory traffic (bytes)."""
    flops = train_flops_per_token(spec, method, seq, rank, policy, trained_share)
    share = get_policy(policy).recompute_share
    acts = layer_activations(spec, method, rank)
    traffic = spec.layers * acts.total * (3 + share)
    if method == "qlora":  # dequantization of every 4-bit linear per forward, recomputation and backward
        stored = sum(quantized_bytes("nf4", t.n_out, t.k_in) * t.copies for t in spec.layer_linears())
        dense = sum(t.params for t in spec.layer_linears())
        traffic += (2 + share) * spec.layers * (stored + 2 * dense) / (seq * batch)
    return {"gemm": flops["gemm"], "attn": flops["attn"], "traffic": traffic}


def seconds_per_token(features: dict[str, float], coef: dict[str, float], gpu: GPU) -> float | None:
    """The time model above for one GPU; None when the GPU's rate or bandwidth is unknown."""
    if gpu.bf16_tflops is None or gpu.bandwidth_gbs is None:
        return None
    peak, bw = gpu.bf16_tflops * 1e12, gpu.bandwidth_gbs * 1e9
    return (
        coef["gemm"] * features["gemm"] / peak
        + coef["attn"] * features["attn"] / peak
        + coef["traffic"] * features["traffic"] / bw
    )


@cache
def _packaged() -> dict:
    try:
        return json.loads(CALIBRATION.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise KindredValueError(f"{CALIBRATION}: cannot read the packaged calibration ({e})") from None


def load_calibration(results_dir: str | Path | None = None, spec_lookup=None) -> dict:
    """The packaged calibration, or one computed from ``results_dir``'s CSVs (``kindred plan --results``)."""
    if results_dir is None:
        return _packaged()
    from .calibrate import calibrate

    if not Path(results_dir).is_dir():
        raise KindredValueError(f"--results: {results_dir} is not a folder of benchmark CSVs")
    return calibrate(results_dir, spec_lookup)


def train_tokens_per_s(
    spec: ModelSpec,
    gpu: GPU,
    method: str = "qlora",
    seq: int = 2048,
    batch: int = 1,
    rank: int = 16,
    policy: str = "full",
    *,
    trainer: str = "kindred",
    calibration: dict | None = None,
    trained_share: float = 1.0,
) -> float | None:
    """Trained tokens per second of ``trainer`` on ``gpu`` (None: no calibration for it, or unknown rates)."""
    cal = calibration or _packaged()
    fit = cal.get("trainers", {}).get(trainer)
    if not fit:
        return None
    feats = step_features(spec, method, seq, batch, rank, policy, trained_share)
    t = seconds_per_token(feats, fit["coef"], gpu)
    return None if t is None else 1.0 / t


def training_seconds(dataset_tokens: int, epochs: float, tokens_per_s: float) -> float:
    """Time to train on ``dataset_tokens`` (the token report's total) for ``epochs``."""
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


def decode_efficiency(gpu: GPU, fmt: str, calibration: dict | None = None) -> tuple[float, str] | None:
    """(fraction of the GPU's bandwidth a batch-1 decode reaches, where it comes from), or None."""
    fmt = normalize_format(fmt)
    kind = "bf16" if fmt == "BF16" else "quantized"
    m = gpu.decode_measured
    if m:  # this GPU's own measured decode (e.g. llama.cpp on an Apple GPU)
        per = decode_bytes_per_token(get_model(m["model"]), m["format"], m["context"])
        return m["tokens_per_s"] * per / (gpu.bandwidth_gbs * 1e9), m["source"]
    dec = (calibration or _packaged()).get("decode", {})
    if kind not in dec:
        return None
    return dec[kind], dec.get("source", "")


def decode_tokens_per_s(
    spec: ModelSpec, gpu: GPU, fmt: str = "Q4_K_M", context: int = 4096, calibration: dict | None = None
) -> float | None:
    """Batch-1 decode rate: bandwidth × measured efficiency / bytes per token (None if either is unknown)."""
    if gpu.bandwidth_gbs is None:
        return None
    eff = decode_efficiency(gpu, fmt, calibration)
    if eff is None:
        return None
    return gpu.bandwidth_gbs * 1e9 * eff[0] / decode_bytes_per_token(spec, normalize_format(fmt), context)
