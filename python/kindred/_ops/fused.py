"""The fused family of the core (``kindred/fused.h``): the small steps of one decode forward in one launch
each, rounding where the unfused torch ops round (no autograd: ``models.decoder`` calls them on its decode
path), and two steps of the training forward with autograd that give eager torch's results and its
autograd's gradients bit for bit: ``rope`` (one kernel each way) and ``swiglu`` (torch's forward, one kernel
for the backward; on the CPU, torch's vectorized exp can move its last bit in float32 and float16). CPU: the
core's reference, CUDA: its kernels. Outputs are allocated here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _core
from ..errors import KindredValueError
from .adapter import opt_view, rows, stream, view


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


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotary on the first rot = cos.shape[1] features of x [rows, heads, D] (unit stride on D), as
    ``models.rope.apply_rotary`` rounds it, or (``inverse``) its transpose, the gradient eager autograd gives.
    cos and sin [rows, rot]; returns a contiguous [rows, heads, D]."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _core.rope_rotate(view(x, "x"), view(cos, "cos"), view(sin, "sin"), inverse, view(out, "out"), stream(x))
    return out


def silu_mul_backward(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) of out = silu(gate) · up for dout, gate, up [M, I] (unit column stride), rounded as
    eager autograd rounds them."""
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _core.silu_mul_backward(
        view(dout, "dout"),
        view(gate, "gate"),
        view(up, "up"),
        view(dgate, "dgate"),
        view(dup, "dup"),
        stream(gate),
    )
    return dgate, dup


def _headrows(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] as [B·T, H, D]: a view where B and T merge and D has unit stride, else a copy."""
    b, t, h, d = x.shape
    if x.stride(3) != 1 or not (b == 1 or t == 1 or x.stride(0) == t * x.stride(1)):
        x = x.contiguous()
    return x.view(b * t, h, d)


def _tablerows(table: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """cos or sin [B or 1, T, rot] as [B·T, rot] with unit column stride (a copy when broadcast over B)."""
    tab = table.expand(b, t, table.shape[-1]).reshape(b * t, table.shape[-1])
    return tab if tab.stride(1) == 1 else tab.contiguous()


class RopeFunction(torch.autograd.Function):
    """apply(x, cos, sin): ``rope``'s autograd; saves cos and sin only (the backward is linear in dy)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        b, t = x.shape[:2]
        ctx.save_for_backward(cos, sin)
        return rope_rotate(_headrows(x), _tablerows(cos, b, t), _tablerows(sin, b, t)).view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        b, t = dy.shape[:2]
        dx = rope_rotate(_headrows(dy), _tablerows(cos, b, t), _tablerows(sin, b, t), inverse=True)
        return dx.view(dy.shape), None, None


class SwigluFunction(torch.autograd.Function):
    """apply(gate, up): ``swiglu``'s autograd; saves gate and up (the backward recomputes silu(gate)).

    The forward is torch's silu and product (the same roundings as silu_mul): at training sizes their
    vectorized kernels took 242 µs together on an H200 where silu_mul's grid-stride loop took 492 µs
    ([8192, 12288] bf16; benchmarks/notes/e2e_profile_7c659b8.txt, _b30fb04.txt); silu_mul serves decoding."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate, dup = silu_mul_backward(rows(dout), rows(gate), rows(up))
        return dgate.view(gate.shape), dup.view(up.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``models.rope.apply_rotary`` (the same values, its autograd's gradient) in one kernel each way, for
    x [B, T, H, D] and cos, sin [B or 1, T, rot] (rot even, <= D). No gradient flows to cos and sin."""
    if x.dim() != 4:
        raise KindredValueError(f"x must be 4-D [batch, tokens, heads, head_dim], got shape {tuple(x.shape)}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.requires_grad:
            raise KindredValueError(
                f"{name} must not require grad: rope has no gradient for the rotary tables"
            )
        if table.dim() != 3 or table.shape[0] not in (1, x.shape[0]) or table.shape[1] != x.shape[1]:
            raise KindredValueError(
                f"{name} must be [{x.shape[0]} or 1, {x.shape[1]}, rot], got shape {tuple(table.shape)}"
            )
    return RopeFunction.apply(x, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for gate, up [..., I] (as ``F.silu(gate) * up`` rounds it), its gradients in one
    kernel."""
    return SwigluFunction.apply(gate, up)
