"""kindred's functional API (ops that take and return torch tensors)."""

from ..weights import DecodeWeight, Int4gWeight, NF4Weight
from .gguf import GGUF_BLOCK_TYPES, dequantize_gguf, quantize_gguf
from .lora import lora_dropout, lora_linear, lora_scaling, lora_workspace
from .loss import LinearCrossEntropyStats, linear_cross_entropy
from .matmul_4bit import has_decode_layout, matmul_4bit, matmul_4bit_decode, repack_decode, unpack_decode
from .quant import (
    AWQ_ORDER,
    DYNAMIC_MAP,
    INT4G_DEFAULT_GROUP,
    INT4G_GROUPS,
    NF4_CODEBOOK,
    NF4_DEFAULT_BLOCKSIZE,
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
    "GGUF_BLOCK_TYPES",
    "IGNORE_INDEX",
    "INT4G_DEFAULT_GROUP",
    "INT4G_GROUPS",
    "NF4_CODEBOOK",
    "NF4_DEFAULT_BLOCKSIZE",
    "DecodeWeight",
    "Int4gWeight",
    "LinearCrossEntropyStats",
    "NF4Weight",
    "TrainableCounts",
    "count_trainable",
    "dequantize_gguf",
    "dequantize_int4g",
    "dequantize_nf4",
    "has_decode_layout",
    "int4g_from_awq",
    "int4g_to_awq",
    "linear_cross_entropy",
    "lora_dropout",
    "lora_linear",
    "lora_scaling",
    "lora_workspace",
    "matmul_4bit",
    "matmul_4bit_decode",
    "pack_bfd",
    "position_ids",
    "quantize_gguf",
    "quantize_int4g",
    "quantize_nf4",
    "repack_decode",
    "unpack_decode",
]
