"""Weight and inference memory by part (bytes); training memory is training.py's (kindred's trainer).

Conventions (python/kindred/plan/README.md has the derivations and the checks against published figures):
- weights per tensor at its format's bits per weight; GGUF mixes follow llama.cpp's per-tensor rules;
- KV cache per layer, sliding-window layers holding only `min(tokens, window)` entries;
- inference = weights + KV cache + llama.cpp's compute buffer for one micro-batch (the output logits and,
  without flash attention, the attention scores); the CUDA context is not included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import _core
from ..errors import KindredValueError
from .catalogue import ModelSpec

GIB = 1 << 30

# Bits per weight of each format, from the block layouts the core defines (formats.h): GGUF blocks (block
# bytes × 8 / block elements), bitsandbytes NF4 with double quantization at blocksize 64 (4.127), and AWQ's
# W4A16 group 128 with zero points (INT4g, 4.156; embeddings and lm_head stay 16-bit).
BLOCK_BPW = {"F32": 32.0} | {
    name: size * 8 / elements for name, (_, elements, size) in _core.GGUF_BLOCK_TYPES.items()
}
NF4_BPW = _core.nf4_bits_per_weight(64, True)
AWQ_BPW = _core.int4g_bits_per_weight(128)
# K-quants need rows (ne[0] = in_features) divisible by 256; llama.cpp falls back (src/llama-quant.cpp,
# tensor_type_fallback): Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, and to F16 when even 32 does not divide.
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# Default tensor type of each llama.cpp file type (llama_ftype_get_default_type).
_GGUF_BASE = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q4_K_M": "Q4_K"}
GGUF_MIXES = tuple(_GGUF_BASE)  # the file types gguf_tensor_type knows
FORMATS = ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "AWQ-INT4", "NF4")
_FORMAT_ALIASES = {
    "AWQ": "AWQ-INT4",
    "INT4": "AWQ-INT4",
    "AWQ_INT4": "AWQ-INT4",
    "FP16": "BF16",
    "F16": "BF16",
}
METHODS = ("qlora", "lora", "full")
# Bytes per KV-cache element: bf16, or llama.cpp's quantized caches (block bits / 8).
KV_BYTES = {"bf16": 2.0, "q8_0": 8.5 / 8, "q4_0": 4.5 / 8}
LLAMA_CPP_UBATCH = 512  # llama.cpp's default micro-batch (n_ubatch): the tokens one compute graph holds


@dataclass
class Breakdown:
    """Bytes by part, in a stable order, with notes on how each part was counted."""

    parts: dict[str, int]
    notes: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def to_dict(self) -> dict:
        return {
            "parts_gib": {k: v / GIB for k, v in self.parts.items()},
            "total_gib": self.total_gib,
            "total_gb": self.total / 1e9,
            "notes": dict(self.notes),
            **self.info,
        }


def normalize_format(fmt: str) -> str:
    key = fmt.strip().upper().replace("-", "_") if fmt else ""
    key = _FORMAT_ALIASES.get(key, key).replace("AWQ_INT4", "AWQ-INT4")
    if key not in FORMATS:
        raise KindredValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    return key


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise KindredValueError(f"{name} must be positive, got {value}")


# Roles that get Q6_K in some layers of *_K_M mixes; llama.cpp counts a fused q/k/v (Phi-3's attn_qkv) as
# attn_v (category_is_attn_v in llama-quant.cpp).
_MORE_BITS = ("attn_v", "attn_qkv", "ffn_down")


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layers that get Q6_K for attn_v / ffn_down in *_K_M mixes (integer division as in C)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def gguf_tensor_type(fmt: str, role: str, layer: int, n_layers: int, k_in: int) -> str:
    """ggml type llama-quantize picks for one tensor of a Q8_0/Q6_K/Q5_K_M/Q4_K_M file (llama-quant.cpp)."""
    base = _GGUF_BASE[fmt]
    if role == "router":
        return "F32"  # ffn_gate_inp is never quantized (tensor_allows_quantization)
    if role == "output":  # lm_head, or the tied token embedding
        qtype = "Q8_0" if base == "Q8_0" else "Q6_K"
    elif fmt.endswith("_K_M") and role in _MORE_BITS and _use_more_bits(layer, n_layers):
        qtype = "Q6_K"
    else:
        qtype = base
    if k_in % 256 and qtype in _FALLBACK:
        qtype = _FALLBACK[qtype]
    if k_in % 32:
        qtype = "F16"
    return qtype


def weight_bits(spec: ModelSpec, fmt: str) -> dict[str, float]:
    """Bits of the stored weights by group: embedding, lm_head, layers (non-expert), experts, norms."""
    fmt = normalize_format(fmt)
    h, v = spec.hidden, spec.vocab
    linears = spec.layer_linears()
    small = spec.layers * spec.layer_small_params() + h
    out = {"embedding": 0.0, "lm_head": 0.0, "layers": 0.0, "experts": 0.0, "norms": 0.0}
    if fmt in _GGUF_BASE:
        embd_role = "output" if spec.tied_embeddings else "token_embd"
        out["embedding"] = v * h * BLOCK_BPW[gguf_tensor_type(fmt, embd_role, 0, 1, h)]
        if not spec.tied_embeddings:
            out["lm_head"] = v * h * BLOCK_BPW[gguf_tensor_type(fmt, "output", 0, 1, h)]
        for i in range(spec.layers):
            for t in linears:
                bits = t.params * BLOCK_BPW[gguf_tensor_type(fmt, t.name, i, spec.layers, t.k_in)]
                out["experts" if t.expert else "layers"] += bits
        out["norms"] = small * 32.0  # llama.cpp keeps norms (and biases) in F32
        return out
    linear_bpw = {"BF16": 16.0, "AWQ-INT4": AWQ_BPW, "NF4": NF4_BPW}[fmt]
    out["embedding"] = v * h * 16.0  # embeddings and lm_head stay 16-bit in AWQ and bitsandbytes checkpoints
    out["lm_head"] = 0.0 if spec.tied_embeddings else v * h * 16.0
    for t in linears:
        out["experts" if t.expert else "layers"] += spec.layers * t.params * linear_bpw
    out["norms"] = small * 16.0
    return out


def weight_bytes(spec: ModelSpec, fmt: str) -> int:
    return round(sum(weight_bits(spec, fmt).values()) / 8)


def bits_per_weight(spec: ModelSpec, fmt: str) -> float:
    """Effective bits per parameter of a whole checkpoint, embeddings and lm_head included."""
    return sum(weight_bits(spec, fmt).values()) / spec.param_counts()["total"]


def kv_cache_bytes(spec: ModelSpec, tokens: int, batch: int = 1, kv_dtype: str = "bf16") -> int:
    """K and V for `tokens` positions; sliding-window layers keep only `min(tokens, window)` of them."""
    _check_positive(tokens=tokens, batch=batch)
    if kv_dtype not in KV_BYTES:
        raise KindredValueError(f"unknown KV-cache dtype {kv_dtype!r}; known: {', '.join(KV_BYTES)}")
    per_entry = 2 * spec.kv_dim * KV_BYTES[kv_dtype]  # K and V of one layer, one position
    full_layers = spec.layers - spec.sliding_layers
    swa_tokens = min(tokens, spec.sliding_window) if spec.sliding_window else 0
    return round(batch * per_entry * (full_layers * tokens + spec.sliding_layers * swa_tokens))


def logits_bytes(tokens: int, vocab: int, bytes_per_element: float = 4) -> int:
    """Memory of a [tokens, vocab] logits tensor (4 bytes: fp32)."""
    _check_positive(tokens=tokens, vocab=vocab, bytes_per_element=bytes_per_element)
    return round(tokens * vocab * bytes_per_element)


def check_sequence(spec: ModelSpec, seq: int) -> None:
    _check_positive(seq=seq)
    if seq > spec.context:
        raise KindredValueError(
            f"sequence length {seq} is longer than {spec.name}'s context of {spec.context} tokens"
        )


def compute_buffer_bytes(spec: ModelSpec, context: int, flash_attention: bool = False) -> int:
    """llama.cpp's compute buffer for one micro-batch: its two largest graph nodes, the output logits
    [n_ubatch, vocab] and, without flash attention, the attention scores [n_ubatch, context] per head, fp32.
    """
    ub = min(LLAMA_CPP_UBATCH, context)
    return 4 * ub * spec.vocab + (0 if flash_attention else 4 * ub * context * spec.heads)


def inference_memory(
    spec: ModelSpec,
    fmt: str = "Q4_K_M",
    context: int = 4096,
    batch: int = 1,
    kv_dtype: str = "bf16",
    flash_attention: bool = False,
) -> Breakdown:
    """Weights at `fmt` + KV cache for `context` tokens × `batch` + llama.cpp's compute buffer."""
    fmt = normalize_format(fmt)
    check_sequence(spec, context)
    parts = {
        "weights": weight_bytes(spec, fmt),
        "kv_cache": kv_cache_bytes(spec, context, batch, kv_dtype),
        "compute_buffer": compute_buffer_bytes(spec, context, flash_attention),
    }
    notes = {
        "weights": f"{fmt} at {bits_per_weight(spec, fmt):.2f} bits/weight overall",
        "kv_cache": f"{kv_dtype}, {context} tokens × {batch}"
        + (
            f", {spec.sliding_layers} of {spec.layers} layers windowed at {spec.sliding_window}"
            if spec.sliding_window
            else ""
        ),
        "compute_buffer": f"logits{'' if flash_attention else ' + attention scores'} of a "
        f"{LLAMA_CPP_UBATCH}-token micro-batch, fp32 (CUDA context not included)",
    }
    return Breakdown(parts, notes, {"format": fmt, "context": context, "batch": batch})
