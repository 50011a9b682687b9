"""What kindred and the serving formats can do with a model: trainable or plan only, refused formats, license.

- kindred trains a model when its model_type is one kindred.models' decoder covers (kindred.models.FAMILIES),
  with LoRA (kindred has no full fine-tuning) on a CUDA GPU (kindred's kernels are CUDA); anything else is
  planned only.
- A weight format is refused when a projection's shape breaks its layout: AWQ W4A16 g128 (AutoAWQ GEMM as
  vLLM reads it) needs in_features divisible by the group (128) and out_features by 8 (eight 4-bit values
  per int32); kindred's INT4g needs in_features divisible by its group; NF4 needs every weight's size
  divisible by its block (kindred.ops.quantize_nf4 decides). GGUF types are never refused: llama.cpp falls
  back per tensor (memory.gguf_tensor_type), which is reported as a note.
- Licenses: the catalogue marks each license permissive or not (Apache-2.0 and MIT are; the Gemma and Llama
  terms are not); ``--license permissive`` keeps the permissive ones, ``commercial`` those allowing
  commercial use.
"""

from __future__ import annotations

from ..errors import KindredValueError
from ..models import FAMILIES
from .catalogue import ModelSpec
from .gpus import GPU
from .memory import gguf_tensor_type, normalize_format
from .training import QUANTS, quantized_bytes, supported

AWQ_GROUP = 128  # the group size of the AWQ W4A16 checkpoints vLLM and AutoAWQ serve
AWQ_PACK = 8  # 4-bit values per int32 along out_features (AutoAWQ GEMM qweight)
LICENSES = ("any", "commercial", "permissive")


def kindred_support(spec: ModelSpec, method: str = "qlora", gpu: GPU | None = None) -> tuple[str, str]:
    """("trainable" | "plan only", why)."""
    if not supported(spec):
        return (
            "plan only",
            f"model_type {spec.model_type!r} is not one of kindred.models' {', '.join(FAMILIES)}",
        )
    if method == "full":
        return "plan only", "kindred trains LoRA adapters, not full fine-tuning"
    if gpu is not None and not gpu.kindred_trains:
        return "plan only", f"{gpu.name}: kindred's kernels are CUDA, this GPU is {gpu.backend}"
    return "trainable", f"{spec.model_type} is a kindred.models family"


def _quantized_linears(spec: ModelSpec):
    return [t for t in spec.layer_linears() if t.name != "router"]


def format_refusal(spec: ModelSpec, fmt: str) -> str | None:
    """Why ``fmt`` cannot hold this model's weights, or None when it can."""
    key = fmt.strip().lower()
    if key in QUANTS:  # kindred's own training formats
        for t in _quantized_linears(spec):
            try:
                quantized_bytes(key, t.n_out, t.k_in)
            except KindredValueError as e:
                return f"{t.name} [{t.n_out}, {t.k_in}]: {e}"
        return None
    fmt = normalize_format(fmt)
    if fmt == "AWQ-INT4":
        for t in _quantized_linears(spec):
            if t.k_in % AWQ_GROUP:
                return f"{t.name} in_features {t.k_in} is not divisible by the AWQ group {AWQ_GROUP}"
            if t.n_out % AWQ_PACK:
                return f"{t.name} out_features {t.n_out} is not divisible by {AWQ_PACK} (AWQ packing)"
    if fmt == "NF4":
        return format_refusal(spec, "nf4")
    return None


def gguf_fallbacks(spec: ModelSpec, fmt: str) -> list[str]:
    """Projections llama.cpp stores in another type than a 256-divisible row would get (K-quant fallbacks)."""
    fmt = normalize_format(fmt)
    if fmt in ("BF16", "AWQ-INT4", "NF4"):
        return []
    out = []
    for t in _quantized_linears(spec):
        got = gguf_tensor_type(fmt, t.name, 0, spec.layers, t.k_in)
        usual = gguf_tensor_type(fmt, t.name, 0, spec.layers, 256)
        if got != usual:
            out.append(f"{t.name} {usual} → {got} (in_features {t.k_in})")
    return out


def license_ok(spec: ModelSpec, rule: str) -> bool:
    if rule not in LICENSES:
        raise KindredValueError(f"unknown license filter {rule!r}; known: {', '.join(LICENSES)}")
    if rule == "permissive":
        return spec.license.get("permissive") is True
    if rule == "commercial":
        return spec.license.get("commercial_use") is True
    return True


def practical_context(spec: ModelSpec) -> int:
    """Seed 004's practical limit per example: about half the context window (8K → ~4K, 128K → ~60K)."""
    return spec.context // 2
