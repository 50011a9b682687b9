"""Independent numpy statements of the 4-bit formats, written from their specs (formats.h, bitsandbytes,
AutoAWQ), used as the bit-exact oracle for kindred's CPU and CUDA paths."""

import numpy as np
import torch

# bitsandbytes get_4bit_type("nf4"), copied from its documentation as the test's own oracle.
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# bitsandbytes' decision tree compares x > threshold, thresholds being the float32 codebook midpoints.
NF4_THRESHOLDS = ((NF4[:-1].astype(np.float64) + NF4[1:]) / 2).astype(np.float32)
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # AutoAWQ: logical column j sits in nibble AWQ_REVERSE_ORDER[j]


def f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def nf4_quantize(w: torch.Tensor, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed u8 [n/2], absmax f32 [blocks]) of w, as bitsandbytes' CUDA kernel computes them."""
    x = f32(w).reshape(-1, blocksize)
    absmax = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(absmax > 0, np.float32(1.0) / absmax, np.float32(0.0)).astype(np.float32)
    scaled = (x * inv[:, None]).astype(np.float32).reshape(-1)
    codes = np.searchsorted(NF4_THRESHOLDS, scaled, side="left").astype(np.uint8)
    return (codes[0::2] << 4 | codes[1::2]).astype(np.uint8), absmax


def nf4_dequantize(packed: np.ndarray, absmax: np.ndarray, blocksize: int) -> np.ndarray:
    codes = np.stack([packed >> 4, packed & 0xF], axis=1).reshape(-1)
    return (
        (NF4[codes].reshape(-1, blocksize) * absmax[:, None].astype(np.float32))
        .astype(np.float32)
        .reshape(-1)
    )


def int4g_quantize(w: torch.Tensor, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed u8 [N, K/2] low nibble first, scales f16 [N, K/g], zeros u8 [N, K/g])."""
    n, k = w.shape
    x = f32(w).reshape(n, k // g, g)
    lo, hi = x.min(axis=2), x.max(axis=2)
    s16 = (np.maximum(hi - lo, np.float32(1e-5)) / np.float32(15)).astype(np.float32).astype(np.float16)
    s = s16.astype(np.float32)
    z = np.clip(np.rint(-lo / s), 0, 15)
    q = np.clip(np.rint(x / s[..., None]) + z[..., None], 0, 15).astype(np.uint8).reshape(n, k)
    return (q[:, 0::2] | q[:, 1::2] << 4).astype(np.uint8), s16, z.astype(np.uint8)


def int4g_dequantize(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g: int) -> np.ndarray:
    n = packed.shape[0]
    q = np.stack([packed & 0xF, packed >> 4], axis=2).reshape(n, -1, g).astype(np.float32)
    w = (q - zeros[..., None].astype(np.float32)) * scales[..., None].astype(np.float32)
    return w.astype(np.float32).reshape(n, -1)


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g: int) -> torch.Tensor:
    """W [N, K] from AutoAWQ GEMM tensors, unpacked the way AutoAWQ's dequantize_gemm does."""
    shifts = torch.arange(0, 32, 4)

    def unpack(t):  # [R, C] int32 -> [R, 8C] in logical column order
        nib = (t.unsqueeze(-1) >> shifts) & 0xF
        return nib[..., AWQ_REVERSE_ORDER].reshape(t.shape[0], -1)

    q, z = unpack(qweight).float(), unpack(qzeros).float()
    z = z.repeat_interleave(g, dim=0)
    s = scales.float().repeat_interleave(g, dim=0)
    return ((q - z) * s).t()
