"""INT4g weights as serving tools store them: compressed-tensors ``pack-quantized`` W4A16 (llm-compressor's
output, what vLLM prefers) and AutoAWQ GEMM, with the ``quantization_config`` each writes into config.json.

Both hold kindred's INT4g exactly (w = (q − z)·s per group of the input dimension, fp16 scales; on
little-endian hosts):

* compressed-tensors, for a linear ``<p>`` [N, K] at group g: ``<p>.weight_packed`` int32 [N, K/8] (element
  k at bits 4·(k mod 8) of word k/8: kindred's packed bytes read as little-endian int32), the stored value
  q − 8 offset by +8, i.e. q itself; ``<p>.weight_scale`` [N, K/g]; ``<p>.weight_zero_point`` int32
  [N/8, K/g] (z packed the same way along the output dimension); ``<p>.weight_shape`` int64 [2].
* AutoAWQ GEMM: ``qweight`` / ``qzeros`` / ``scales`` (kindred.ops.quant.int4g_to_awq).
"""

from __future__ import annotations

import torch

from ..errors import KindredFormatError
from ..weights import Int4gWeight

CT_KEYS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
AWQ_KEYS = ("qweight", "qzeros", "scales")


def compressed_tensors_config(group_size: int, ignore: list[str]) -> dict:
    """config.json's quantization_config of a compressed-tensors W4A16 asymmetric checkpoint."""
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def awq_gemm_config(group_size: int, not_converted: list[str]) -> dict:
    """config.json's quantization_config of an AutoAWQ GEMM checkpoint."""
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": not_converted,
    }


def _pack_rows(z: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, G] -> int32 [N/8, G], eight consecutive rows per word (row r at 4·(r mod 8))."""
    n, g = z.shape
    t = z.t().contiguous().to(torch.uint8)  # [G, N]
    pairs = t[:, 0::2] | (t[:, 1::2] << 4)  # [G, N/2]
    return pairs.reshape(-1).view(torch.int32).reshape(g, n // 8).t().contiguous()  # flat: any G


def _unpack_rows(packed: torch.Tensor, n: int) -> torch.Tensor:
    g = packed.shape[1]
    b = packed.t().reshape(-1).view(torch.uint8).reshape(g, -1)  # [G, N/2]
    z = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(g, -1)[:, :n]
    return z.t().contiguous()


def int4g_to_compressed_tensors(
    q: Int4gWeight, scale_dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of ``q`` (keys CT_KEYS), exactly; the fp16 scales stored as
    ``scale_dtype`` (float16, or float32, in which readers dequantize without rounding)."""
    if scale_dtype not in (torch.float16, torch.float32):
        raise KindredFormatError(
            f"scale_dtype must be float16 or float32 (exact for fp16 scales), got {scale_dtype}"
        )
    n, k = q.shape
    if n % 8 or k % 8:
        raise KindredFormatError(f"pack-quantized needs rows and columns in multiples of 8, got [{n}, {k}]")
    src = q.to("cpu")
    return {
        "weight_packed": src.packed.reshape(-1).view(torch.int32).reshape(n, k // 8),
        "weight_scale": src.scales.to(scale_dtype).contiguous(),
        "weight_zero_point": _pack_rows(src.zeros),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }


def int4g_from_compressed_tensors(
    tensors: dict[str, torch.Tensor], group_size: int, dtype: torch.dtype, source: str = "checkpoint"
) -> Int4gWeight:
    """The Int4gWeight of compressed-tensors tensors (lossless while the scales are fp16-exact)."""
    for key in CT_KEYS:
        if key not in tensors:
            raise KindredFormatError(f"{source}: missing '{key}' of a pack-quantized linear")
    n, k = (int(v) for v in tensors["weight_shape"].tolist())
    packed = tensors["weight_packed"]
    if packed.dtype != torch.int32 or tuple(packed.shape) != (n, k // 8):
        raise KindredFormatError(
            f"{source}: weight_packed must be int32 [{n}, {k // 8}], got {tuple(packed.shape)}"
        )
    scale = tensors["weight_scale"]
    if tuple(scale.shape) != (n, k // group_size):
        raise KindredFormatError(
            f"{source}: weight_scale must be [{n}, {k // group_size}] for group {group_size}, "
            f"got {tuple(scale.shape)}"
        )
    scales = scale.to(torch.float16)
    if not torch.equal(scales.to(scale.dtype), scale):
        raise KindredFormatError(
            f"{source}: weight_scale holds values fp16 cannot represent (INT4g keeps fp16 scales)"
        )
    zeros = _unpack_rows(tensors["weight_zero_point"], n)
    if tuple(zeros.shape) != (n, k // group_size):
        raise KindredFormatError(f"{source}: weight_zero_point does not unpack to [{n}, {k // group_size}]")
    packed_u8 = packed.reshape(-1).view(torch.uint8).reshape(n, k // 2)
    return Int4gWeight(packed_u8.contiguous(), scales.contiguous(), zeros, group_size, dtype)
