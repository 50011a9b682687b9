"""Qwen3.5's linear-attention layers: a gated DeltaNet token mixer (transformers' ``linear_attn``).

Per token t, with q_t, k_t L2-normalized per head (q also scaled by d_k^-1/2), a decay α_t = e^{g_t} and a
write strength β_t, the state S [d_k, d_v] of each value head follows the gated delta rule

    S_t = α_t S_{t-1} + β_t k_t (v_t − α_t S_{t-1}ᵀ k_t)ᵀ,    o_t = S_tᵀ q_t.

:func:`gated_delta_rule` evaluates it in chunks of C tokens (within a chunk the updates are solved as one
unit-lower-triangular system, then the state is updated once per chunk), in torch ops on any device;
:func:`gated_delta_rule_recurrent` is the token-by-token definition the chunked form is tested against.
A packed row restarts the state, and the causal convolution, at every document boundary.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig

CHUNK = 64


def _prepare(q, k, v, g, beta):
    """[B, T, H, D] q, k (repeated to the value heads), v and [B, T, H] g, beta -> float32 [B, H, T, ...]."""
    group = v.shape[2] // q.shape[2]
    if group > 1:
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    q, k = q.float(), k.float()
    # L2 normalization with the epsilon inside the root (as the FLA kernels Qwen3.5 was trained with)
    q, k = (x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6) for x in (q, k))
    q = q * q.shape[-1] ** -0.5
    return [x.transpose(1, 2).float() for x in (q, k, v, g, beta)]


def gated_delta_rule_recurrent(q, k, v, g, beta) -> torch.Tensor:
    """The gated delta rule token by token (the reference): o [B, T, Hv, Dv] in v's dtype."""
    dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    b, h, t, dk = k.shape
    state = k.new_zeros(b, h, dk, v.shape[-1])
    out = []
    for i in range(t):
        state = state * g[:, :, i, None, None].exp()
        err = v[:, :, i] - (state * k[:, :, i, :, None]).sum(-2)
        state = state + beta[:, :, i, None, None] * k[:, :, i, :, None] * err[:, :, None, :]
        out.append((state * q[:, :, i, :, None]).sum(-2))
    return torch.stack(out, dim=2).transpose(1, 2).to(dtype)


def gated_delta_rule(q, k, v, g, beta, chunk: int = CHUNK) -> torch.Tensor:
    """The gated delta rule in chunks: o [B, T, Hv, Dv] in v's dtype (float32 inside)."""
    dtype, t = v.dtype, v.shape[1]
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    pad = (-t) % chunk
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    b, h, total, dk = k.shape
    n = total // chunk
    q, k, v = (x.reshape(b, h, n, chunk, -1) for x in (q, k, v))
    g, beta = g.reshape(b, h, n, chunk), beta.reshape(b, h, n, chunk)
    gamma = g.cumsum(-1)  # log decay from the chunk's start to each token
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=v.device).tril()
    # decay between tokens j <= i of a chunk: e^{γ_i − γ_j} (0 above the diagonal)
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    kb = k * beta[..., None]
    # (I + A) U = β V and (I + A) W = β e^γ K, A = strictly lower (β_i k_i·k_j e^{γ_i − γ_j})
    a = (kb @ k.transpose(-1, -2)) * decay
    system = a.tril(-1) + torch.eye(chunk, device=v.device)
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, kb * gamma.exp()[..., None], upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * gamma.exp()[..., None]
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]
    state = v.new_zeros(b, h, dk, v.shape[-1])
    out = []
    for c in range(n):
        new = u[:, :, c] - w[:, :, c] @ state
        out.append(q_decayed[:, :, c] @ state + scores[:, :, c] @ new)
        state = state * gamma[:, :, c, -1, None, None].exp() + k_to_end[:, :, c].transpose(-1, -2) @ new
    o = torch.stack(out, dim=2).reshape(b, h, total, -1)[:, :, :t]
    return o.transpose(1, 2).to(dtype)


class GatedRMSNorm(nn.Module):
    """rms_norm(x) · w · silu(gate), normalized in float32 (the output norm of a linear-attention layer)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight
        return (normed * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """Projections, a causal depthwise convolution (SiLU) over q, k and v, the gated delta rule, a gated
    norm and the output projection (transformers' ``linear_attn``: the same parameter names)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        c = config
        self.k_heads, self.v_heads = c.linear_key_heads, c.linear_value_heads
        self.k_dim, self.v_dim = c.linear_key_head_dim, c.linear_value_head_dim
        keys, values = self.k_heads * self.k_dim, self.v_heads * self.v_dim
        self.conv_dim = 2 * keys + values
        self.in_proj_qkv = nn.Linear(c.hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(c.hidden_size, values, bias=False)
        self.in_proj_b = nn.Linear(c.hidden_size, self.v_heads, bias=False)
        self.in_proj_a = nn.Linear(c.hidden_size, self.v_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, c.linear_conv_kernel, groups=self.conv_dim, bias=False
        )
        self.dt_bias = nn.Parameter(torch.ones(self.v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.v_heads))
        self.norm = GatedRMSNorm(self.v_dim, c.rms_norm_eps)
        self.out_proj = nn.Linear(values, c.hidden_size, bias=False)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        """One document (or an unpacked batch) x [B, T, H] -> the delta rule's output [B, T, Hv, Dv]."""
        b, t, _ = x.shape
        qkv = self.in_proj_qkv(x).transpose(1, 2)
        kernel = self.conv1d.weight.shape[-1]
        qkv = F.silu(F.conv1d(F.pad(qkv, (kernel - 1, 0)), self.conv1d.weight, groups=self.conv_dim))
        keys = self.k_heads * self.k_dim
        q, k, v = qkv.transpose(1, 2).split([keys, keys, self.v_heads * self.v_dim], dim=-1)
        q, k = q.reshape(b, t, self.k_heads, self.k_dim), k.reshape(b, t, self.k_heads, self.k_dim)
        v = v.reshape(b, t, self.v_heads, self.v_dim)
        beta = self.in_proj_b(x).sigmoid()
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        return gated_delta_rule(q, k, v, g, beta)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        if cu_seqlens is None:
            o = self._mix(x)
        else:  # packed documents: each starts from a zero state and an empty convolution window
            bounds = cu_seqlens.tolist()
            o = torch.cat([self._mix(x[:, s:e]) for s, e in itertools.pairwise(bounds) if e > s], 1)
        z = self.in_proj_z(x).reshape(b, t, self.v_heads, self.v_dim)
        return self.out_proj(self.norm(o, z).reshape(b, t, -1))
