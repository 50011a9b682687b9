"""MXFP4 (OCP microscaling FP4), as gpt-oss checkpoints store their expert weights; kindred's one definition.

A tensor W [..., K] is stored as ``<name>_blocks`` u8 [..., K / 32, 16] and ``<name>_scales`` u8
[..., K / 32]: each block of 32 consecutive values along K is 16 bytes of E2M1 codes, two per byte (element
2j in the low nibble, 2j + 1 in the high one), and one E8M0 scale, the power of two 2^(scale − 127) it
multiplies them by.
"""

from __future__ import annotations

import torch

from ..errors import KindredFormatError

MXFP4_BLOCK = 32  # values per block (one scale each)
E8M0_BIAS = 127
# The 16 E2M1 codes: sign bit 3, then two exponent bits and one mantissa bit.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_shape(blocks_shape: tuple[int, ...], scales_shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """The logical shape [..., K] of a blocks / scales pair, or KindredFormatError naming ``name``."""
    blocks_shape, scales_shape = tuple(blocks_shape), tuple(scales_shape)
    if len(blocks_shape) < 2 or blocks_shape[-1] != MXFP4_BLOCK // 2:
        raise KindredFormatError(
            f"{name}_blocks: MXFP4 blocks must be [..., K/{MXFP4_BLOCK}, {MXFP4_BLOCK // 2}], "
            f"got {list(blocks_shape)}"
        )
    if scales_shape != blocks_shape[:-1]:
        raise KindredFormatError(
            f"{name}_scales: has shape {list(scales_shape)}, its blocks {list(blocks_shape)} need "
            f"{list(blocks_shape[:-1])}"
        )
    return (*blocks_shape[:-2], blocks_shape[-2] * MXFP4_BLOCK)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, name: str = "weight"
) -> torch.Tensor:
    """The dense [..., K] tensor of MXFP4 ``blocks`` u8 [..., K/32, 16] and ``scales`` u8 [..., K/32].

    Decoded one leading slice at a time, so the temporaries stay at one slice's size. Exact in bf16 and
    f32 (every E2M1 value times a power of two in range is representable).
    """
    for t, part in ((blocks, "blocks"), (scales, "scales")):
        if t.dtype != torch.uint8:
            raise KindredFormatError(f"{name}_{part}: MXFP4 {part} must be uint8, got {t.dtype}")
    shape = mxfp4_shape(blocks.shape, scales.shape, name)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    b = blocks.reshape(-1, *blocks.shape[-2:])
    s = scales.reshape(-1, scales.shape[-1])
    out = torch.empty(b.shape[0], b.shape[1], MXFP4_BLOCK, dtype=dtype, device=blocks.device)
    for i in range(b.shape[0]):
        codes = torch.stack((b[i] & 0x0F, b[i] >> 4), dim=-1).reshape(b.shape[1], MXFP4_BLOCK)
        exp = s[i].to(torch.int32)[:, None] - E8M0_BIAS
        out[i] = torch.ldexp(lut[codes.long()], exp.float()).to(dtype)
    return out.reshape(shape)
