"""Serving numbers: vLLM's KV-cache pool and slots, llama.cpp / Ollama memory per GGUF type, host RAM.

vLLM (``vllm_kv_cache``): at start-up vLLM loads the weights, runs one profiling forward of
``max_num_batched_tokens`` tokens and gives the KV cache everything else under its budget:

    budget    = gpu_memory_utilization × total GPU memory
    kv pool   = budget − weights − peak activations of the profiling run − memory outside torch
    slots     = ⌊kv pool / (block_size × KV bytes per token)⌋    (vLLM's "GPU blocks"; KV bytes per token:
                2 × layers × kv_heads × head_dim × element size)
    tokens    = slots × block_size; requests of ``context`` tokens served at once = tokens / context

Sliding-window layers hold at most their window per request (vLLM's hybrid allocator), so a request of a
windowed model takes fewer slots (``per_request_bytes``). The activation peak is estimated from the
profiling forward: the fused gate/up output and the activation's output of ``max_num_batched_tokens``
tokens ([T, 2·ff] + [T, ff] in bf16), the residual and hidden states ([T, h] × 3) and the sampler's fp32
logits of ``max_num_seqs`` sequences with one softmax copy ([S, vocab] × 2 × 4 B). Memory outside torch
(CUDA context, cuBLAS, NCCL) and CUDA graphs are not estimated: pass what you measured as ``other_bytes``.

Seed 001 (Qwen3-8B AWQ on an RTX 5080 at 8K context) reported 12.5 GiB in use and 1,607 KV-cache slots.
1,607 blocks of 16 tokens at 144 KiB per token is a 3.53 GiB pool (25,712 tokens: 3.1 requests of 8,192
tokens at once); with kindred's 5.68 GiB AWQ weight estimate, the 12.5 GiB in use leave 3.29 GiB for the
activation profile, CUDA graphs and the runtime (the seed's "~5.5 GiB KV cache" is 12.5 − 7.0 and counts
those too). The tests reproduce the slot count from that decomposition.

llama.cpp / Ollama (``gguf_memory``): the file's tensors (the per-tensor type rule of memory.py), the
KV cache at ``context`` (f16 by default; q8_0 / q4_0 with a quantized cache) and the compute buffer of one
micro-batch (``n_ubatch`` = 512 tokens): the output logits [n_ubatch, vocab] fp32 and, without flash
attention, the attention scores [n_ubatch, context] fp32 per head — the two largest nodes of llama.cpp's
graph. Host RAM: the GGUF file is memory-mapped while it loads (page cache of its size).
"""

from __future__ import annotations

from ..errors import KindredValueError
from .catalogue import ModelSpec
from .memory import (
    GIB,
    KV_BYTES,
    check_sequence,
    inference_memory,
    kv_cache_bytes,
    normalize_format,
    weight_bytes,
)

GGUF_TYPES = ("Q4_K_M", "Q5_K_M", "Q8_0", "F16")
VLLM_BLOCK_SIZE = 16  # vLLM's default --block-size on CUDA


def _positive(**values) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise KindredValueError(f"{name} must be positive, got {value}")


def kv_bytes_per_token(spec: ModelSpec, kv_dtype: str = "bf16") -> int:
    """K and V of every layer for one position (sliding-window layers included)."""
    return kv_cache_bytes(spec, 1, 1, kv_dtype)


def vllm_activation_bytes(
    spec: ModelSpec, max_num_batched_tokens: int = 8192, max_num_seqs: int = 256
) -> int:
    """Peak activations of vLLM's profiling forward (see the module docstring)."""
    _positive(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)
    t = max_num_batched_tokens
    ff = spec.intermediate * (spec.experts_per_token if spec.is_moe else 1)
    return 2 * t * (3 * ff + 3 * spec.hidden) + 2 * 4 * max_num_seqs * spec.vocab


def vllm_kv_cache(
    spec: ModelSpec,
    gpu_memory_bytes: int,
    fmt: str = "AWQ-INT4",
    context: int = 8192,
    gpu_memory_utilization: float = 0.9,
    *,
    kv_dtype: str = "bf16",
    block_size: int = VLLM_BLOCK_SIZE,
    activation_bytes: int | None = None,
    other_bytes: int = 0,
) -> dict:
    """vLLM's KV-cache pool, slots (blocks) and concurrent requests (see the module docstring)."""
    check_sequence(spec, context)
    _positive(gpu_memory_bytes=gpu_memory_bytes, block_size=block_size)
    if not 0 < gpu_memory_utilization <= 1:
        raise KindredValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if kv_dtype not in KV_BYTES:
        raise KindredValueError(f"unknown KV-cache dtype {kv_dtype!r}; known: {', '.join(KV_BYTES)}")
    weights = weight_bytes(spec, fmt)
    act = vllm_activation_bytes(spec) if activation_bytes is None else activation_bytes
    budget = gpu_memory_utilization * gpu_memory_bytes
    pool = budget - weights - act - other_bytes
    per_token = kv_bytes_per_token(spec, kv_dtype)
    slots = max(0, int(pool // (block_size * per_token)))
    per_request = kv_cache_bytes(spec, context, 1, kv_dtype)
    return {
        "budget_bytes": budget,
        "weights_bytes": weights,
        "activation_bytes": act,
        "other_bytes": other_bytes,
        "pool_bytes": max(0.0, pool),
        "pool_gib": max(0.0, pool) / GIB,
        "block_size": block_size,
        "slots": slots,
        "tokens": slots * block_size,
        "per_request_bytes": per_request,
        "concurrent_requests": max(0.0, pool) / per_request,
        "fits": pool >= per_request,
    }


def gguf_memory(
    spec: ModelSpec,
    fmt: str = "Q4_K_M",
    context: int = 4096,
    *,
    kv_dtype: str = "bf16",
    flash_attention=False,
) -> dict:
    """Device memory llama.cpp / Ollama uses for one sequence of ``context`` tokens, by part (bytes)."""
    label = "F16" if fmt.strip().upper() == "F16" else normalize_format(fmt)
    b = inference_memory(spec, "BF16" if label == "F16" else label, context, 1, kv_dtype, flash_attention)
    return {
        "format": label,
        **{f"{k}_bytes": v for k, v in b.parts.items()},
        "total_bytes": b.total,
        "total_gib": b.total_gib,
        "host_bytes": b.parts["weights"],  # the memory-mapped file while it loads
    }


def gguf_table(spec: ModelSpec, context: int = 4096, **kwargs) -> list[dict]:
    """``gguf_memory`` for Q4_K_M, Q5_K_M, Q8_0 and F16."""
    return [gguf_memory(spec, fmt, context, **kwargs) for fmt in GGUF_TYPES]
