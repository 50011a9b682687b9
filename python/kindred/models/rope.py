"""Rotary position embeddings with the scaling rules of the supported families.

Frequencies follow transformers' ``modeling_rope_utils`` (default, linear, llama3, longrope, yarn), so
kindred's logits match transformers' on the same weights; only the first ``partial_rotary_factor`` of each
head rotates (Phi-4-mini).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import RopeConfig


def rope_frequencies(rope: RopeConfig, head_dim: int, long: bool = False) -> tuple[torch.Tensor, float]:
    """(inv_freq f32 [rotary_dim / 2], attention scaling of cos and sin) on the CPU.

    ``long`` selects longrope's long-context factors (used once positions pass the original context).
    """
    dim = int(head_dim * rope.partial_rotary_factor)
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (rope.theta**exponent)
    kind = rope.rope_type
    if kind == "linear":
        return inv_freq / rope.factor, 1.0
    if kind == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if kind == "longrope":
        ext = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        scaling = rope.attention_factor
        if scaling is None:
            orig = rope.original_max_position_embeddings
            scaling = 1.0 if rope.factor <= 1.0 else math.sqrt(1 + math.log(rope.factor) / math.log(orig))
        return 1.0 / (ext * rope.theta**exponent), float(scaling)
    if kind == "yarn":
        return _yarn(rope, dim)
    return inv_freq, 1.0


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    old = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, base, orig = rope.factor, rope.theta, rope.original_max_position_embeddings
    scaling = rope.attention_factor
    if scaling is None:
        if rope.mscale and rope.mscale_all_dim:
            scaling = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
        else:
            scaling = get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(scaling)


class RotaryEmbedding(nn.Module):
    """cos and sin [B, T, rotary_dim] for position ids [B, T], in the activations' dtype."""

    def __init__(self, rope: RopeConfig, head_dim: int, device: torch.device | str | None = None):
        super().__init__()
        self.rope = rope
        inv_freq, self.attention_scaling = rope_frequencies(rope, head_dim)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        if rope.rope_type == "longrope":
            long_freq, _ = rope_frequencies(rope, head_dim, long=True)
            self.register_buffer("inv_freq_long", long_freq.to(device), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.rope.rope_type == "longrope":  # chosen on the device: no host sync
            past_original = position_ids.max() + 1 > self.rope.original_max_position_embeddings
            inv_freq = torch.where(past_original, self.inv_freq_long, self.inv_freq)
        freqs = position_ids[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] features of x [B, T, H, D] (rotate-half layout, as in transformers)."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x_rot, x_pass = (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    out = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if x_pass is None else torch.cat((out, x_pass), dim=-1)
