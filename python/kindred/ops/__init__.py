"""kindred's functional API (ops that take and return torch tensors)."""

from .gguf import GGUF_BLOCK_TYPES, dequantize_gguf
from .lora import lora_dropout, lora_linear, lora_scaling, lora_workspace
from .loss import LinearCrossEntropyStats, linear_cross_entropy
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
    matmul_4bit,
    quantize_int4g,
    quantize_nf4,
)
from .tokens import IGNORE_INDEX, TrainableCounts, count_trainable, pack_bfd, position_ids

__all__ = [
    "AWQ_ORDER",
    "DYNAMIC_MAP",
    "GGUF_BLOCK_TYPES",
    "IGNORE_INDEX",
    "INT4G_DEFAULT_GROUP",
    "INT4G_GROUPS",
    "NF4_CODEBOOK",
    "NF4_DEFAULT_BLOCKSIZE",
    "Int4gWeight",
    "LinearCrossEntropyStats",
    "NF4Weight",
    "TrainableCounts",
    "count_trainable",
    "dequantize_gguf",
    "dequantize_int4g",
    "dequantize_nf4",
    "int4g_from_awq",
    "int4g_to_awq",
    "linear_cross_entropy",
    "lora_dropout",
    "lora_linear",
    "lora_scaling",
    "lora_workspace",
    "matmul_4bit",
    "pack_bfd",
    "position_ids",
    "quantize_int4g",
    "quantize_nf4",
]
