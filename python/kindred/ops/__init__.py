"""kindred's functional API (ops that take and return torch tensors)."""

from .quant import (
    AWQ_ORDER,
    DYNAMIC_MAP,
    INT4G_DEFAULT_GROUP,
    INT4G_GROUPS,
    NF4_CODEBOOK,
    NF4_DEFAULT_BLOCKSIZE,
    Int4gWeight,
    NF4Weight,
    dequantize_int4g,
    dequantize_nf4,
    int4g_from_awq,
    int4g_to_awq,
    quantize_int4g,
    quantize_nf4,
)
from .tokens import IGNORE_INDEX, TrainableCounts, count_trainable, pack_bfd, position_ids

__all__ = [
    "AWQ_ORDER",
    "DYNAMIC_MAP",
    "IGNORE_INDEX",
    "INT4G_DEFAULT_GROUP",
    "INT4G_GROUPS",
    "NF4_CODEBOOK",
    "NF4_DEFAULT_BLOCKSIZE",
    "Int4gWeight",
    "NF4Weight",
    "TrainableCounts",
    "count_trainable",
    "dequantize_int4g",
    "dequantize_nf4",
    "int4g_from_awq",
    "int4g_to_awq",
    "pack_bfd",
    "position_ids",
    "quantize_int4g",
    "quantize_nf4",
]
