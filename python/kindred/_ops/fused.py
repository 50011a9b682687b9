"""The fused family of the core (``kindred/fused.h``): the small steps of one decode forward in one launch
each, rounding where the unfused torch ops round. Inference only (no autograd); CPU: the core's reference,
CUDA: its kernels. Outputs are allocated here; ``models.decoder`` calls these on its decode path.
"""

from __future__ import annotations

import torch

from .. import _core
from .adapter import opt_view, stream, view


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(s)·w, s) for s = x + residual, over rows [M, D] (any leading shape, last dim D)."""
    shape = x.shape
    x2, r2 = x.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1])
    out, s = torch.empty_like(x2), torch.empty_like(x2)
    _core.add_rms_norm(
        view(x2, "x"),
        view(r2, "residual"),
        view(w, "w"),
        eps,
        view(out, "out"),
        view(s, "residual_out"),
        stream(x),
    )
    return out.view(shape), s.view(shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for [M, I] column ranges (unit column stride) of one buffer or two."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _core.silu_mul(view(gate, "gate"), view(up, "up"), view(out, "out"), stream(gate))
    return out


def rope_qk_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """One decode step's q/k norm + rotary, k and v written into the cache at (row b, slots[b]); returns q
    [B, H, D]. q [B, H·D], k and v [B, Hkv·D], cos and sin [B, rot], caches [rows, Hkv, capacity, D]."""
    d = cache_k.shape[-1]
    q_out = torch.empty(q.shape[0], q.shape[1] // d, d, dtype=q.dtype, device=q.device)
    _core.rope_qk_cache(
        view(q, "q"),
        view(k, "k"),
        view(v, "v"),
        opt_view(q_norm, "q_norm"),
        opt_view(k_norm, "k_norm"),
        eps,
        view(cos, "cos"),
        view(sin, "sin"),
        view(cache_k, "cache_k"),
        view(cache_v, "cache_v"),
        view(slots, "slots"),
        view(q_out, "q_out"),
        stream(q),
    )
    return q_out
