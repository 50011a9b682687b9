"""Functional API of the lora family: ``lora_linear`` over a frozen dense or 4-bit base (grads for x, A, B).

y = x·Wᵀ (+ bias) + s·(drop(x)·Aᵀ)·Bᵀ with A = PEFT's lora_A.weight [r, K], B = lora_B.weight [N, r] and
s = α/r (α/√r with rsLoRA). The backward saves x and the small s·drop(x)·Aᵀ and recomputes the dropout
mask from its seed (kindred/_ops/lora.py has the CUDA plan).
"""

from __future__ import annotations

import math

import torch

from .._ops import lora as _lora
from ..errors import KindredValueError
from ..weights import Int4gWeight, NF4Weight

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if not isinstance(r, int) or r < 1:
        raise KindredValueError(f"r must be a positive int, got {r!r}")
    if not math.isfinite(alpha):
        raise KindredValueError(f"alpha must be finite, got {alpha!r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_workspace(weight: torch.Tensor, r: int) -> torch.Tensor:
    """A [N, padded] buffer holding ``weight`` [N, K] in its first K columns and room for a rank-``r`` B after
    them. Use ``ws[:, :K]`` as the base weight and pass ``workspace=ws`` to lora_linear: on CUDA the forward
    and backward then run one GEMM against [W | B] without copying W."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise KindredValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight))}")
    n, k = weight.shape
    if not isinstance(r, int) or not 1 <= r <= min(n, k):
        raise KindredValueError(f"r must be an int in [1, min(K, N) = {min(n, k)}], got {r!r}")
    ws = torch.zeros(n, _lora.padded_width(k, r), dtype=weight.dtype, device=weight.device)
    ws[:, :k].copy_(weight.detach())
    return ws


def _base_args(base, x: torch.Tensor, workspace: torch.Tensor | None):
    """(format, tensors, param, [N, K]) of a base weight, checked against x."""
    if isinstance(base, NF4Weight) and len(base.shape) != 2:
        raise KindredValueError(f"base (NF4) must be 2-D [out_features, in_features], got {base.shape}")
    if isinstance(base, (NF4Weight, Int4gWeight)):
        parts, fmt, param = base.op_args()
        return fmt, parts, param, tuple(base.shape), base.device
    if not isinstance(base, torch.Tensor):
        raise KindredValueError(
            f"base must be a weight tensor [N, K], an NF4Weight or an Int4gWeight, got {type(base).__name__}"
        )
    if base.dim() != 2:
        raise KindredValueError(
            f"base must be 2-D [out_features, in_features], got shape {tuple(base.shape)}"
        )
    if base.dtype != x.dtype:
        raise KindredValueError(f"base has dtype {base.dtype} but x has {x.dtype}: they must match")
    if base.requires_grad and torch.is_grad_enabled():
        raise KindredValueError(
            "base requires grad, but the base weight is frozen: call requires_grad_(False)"
        )
    if base.stride(-1) != 1:
        base = base.contiguous()
    if workspace is None:
        return "dense", [base], 0, tuple(base.shape), base.device
    n, k = base.shape
    if (
        not isinstance(workspace, torch.Tensor)
        or workspace.dim() != 2
        or workspace.shape[0] != n
        or workspace.data_ptr() != base.data_ptr()
        or base.stride() != workspace.stride()
        or workspace.dtype != base.dtype
    ):
        raise KindredValueError(
            "workspace must be the [N, >= K + r] buffer whose first K columns are base (see lora_workspace)"
        )
    return "workspace", [workspace], 0, (n, k), base.device


def _seed_tensor(seed, generator, device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int32 or seed.numel() != 2:
            raise KindredValueError(f"seed tensor must be int32 [2], got {seed.dtype} {tuple(seed.shape)}")
        return seed.to(device).contiguous()
    if seed is not None:
        if not isinstance(seed, int):
            raise KindredValueError(f"seed must be an int or an int32 [2] tensor, got {type(seed).__name__}")
        words = [(seed & 0xFFFFFFFF), (seed >> 32) & 0xFFFFFFFF]
        return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32).to(
            device
        )
    gen_device = generator.device if generator is not None else device
    return torch.randint(
        -(2**31), 2**31 - 1, (2,), dtype=torch.int32, device=gen_device, generator=generator
    ).to(device)


def lora_linear(
    x: torch.Tensor,
    base: torch.Tensor | NF4Weight | Int4gWeight,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ (+ bias) + scaling·(drop(x)·Aᵀ)·Bᵀ for x [..., K], W the frozen ``base`` [N, K] (dense in x's
    dtype, or an NF4Weight / Int4gWeight dequantized to x's dtype), A [r, K], B [N, r] in x's dtype.

    Dropout (p = ``dropout_p``, only when ``training``) masks the input of the A path by a counter hash of
    (seed, flat index): the same mask on CPU and CUDA. ``seed``: an int, an int32 [2] tensor (no host sync,
    traceable), or None to draw one from ``generator`` (default: torch's generator on x's device).
    ``workspace``: see lora_workspace. Gradients flow to x, A and B; the base and bias are frozen.
    """
    if not isinstance(x, torch.Tensor):
        raise KindredValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise KindredValueError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    fmt, parts, param, (n, k), device = _base_args(base, x, workspace)
    if x.dim() < 1 or x.shape[-1] != k:
        raise KindredValueError(f"x must end in in_features={k} (base is [{n}, {k}]), got {tuple(x.shape)}")
    for name, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise KindredValueError(
                f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}"
            )
    r = A.shape[0]
    if not 1 <= r <= min(k, n):
        raise KindredValueError(
            f"the LoRA rank r = A.shape[0] must be in [1, min(K, N) = {min(k, n)}], got {r}"
        )
    if tuple(A.shape) != (r, k):
        raise KindredValueError(f"A (lora_A) must have shape [r, K] = [{r}, {k}], got {tuple(A.shape)}")
    if tuple(B.shape) != (n, r):
        raise KindredValueError(f"B (lora_B) must have shape [N, r] = [{n}, {r}], got {tuple(B.shape)}")
    tensors = [("A", A), ("B", B)] + ([("bias", bias)] if bias is not None else [])
    for name, t in tensors:
        if t.dtype != x.dtype:
            raise KindredValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}: they must match")
        if t.device != x.device:
            raise KindredValueError(f"{name} is on {t.device} but x is on {x.device}")
    if device != x.device:
        raise KindredValueError(f"base is on {device} but x is on {x.device}")
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise KindredValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
        if bias.requires_grad and torch.is_grad_enabled():
            raise KindredValueError("bias requires grad, but the base is frozen: call requires_grad_(False)")
    if fmt == "workspace" and workspace.shape[1] < k + r:
        raise KindredValueError(f"workspace has {workspace.shape[1]} columns, needs >= K + r = {k + r}")
    if x.is_cuda and x.dtype == torch.float64:
        raise KindredValueError("float64 lora_linear runs on the CPU only (the float64 reference)")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise KindredValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise KindredValueError(f"scaling must be finite (a number), got {scaling!r}")
    p = float(dropout_p) if training else 0.0
    seed_t = _seed_tensor(seed, generator, x.device) if p > 0.0 else None
    flat = x.dim() == 2  # no reshape either way (each would add an autograd node)
    x2 = (x if flat else x.reshape(-1, k)).contiguous()
    a, b, s = A.contiguous(), B.contiguous(), float(scaling)
    if _eager(x):
        y, _ = _lora.LoraLinearFunction.apply(x2, parts, fmt, param, a, b, bias, s, p, seed_t)
    else:
        y, _ = torch.ops.kindred.lora_linear(x2, parts, fmt, param, a, b, bias, s, p, seed_t)
    return y if flat else y.reshape(*x.shape[:-1], n)


def _eager(x: torch.Tensor) -> bool:
    """Whether the call takes the autograd.Function around the CUDA plan rather than the custom op: on CUDA
    outside torch.compile (the op keeps its fake impl for tracing and the C++ reference on the CPU)."""
    return x.is_cuda and not torch.compiler.is_compiling()


def lora_dropout(x: torch.Tensor, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """The dropped x that lora_linear's A path sees for this seed (any shape, flattened to [-1, K])."""
    if not (0.0 <= p < 1.0):
        raise KindredValueError(f"p must be in [0, 1), got {p!r}")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if p == 0.0:
        return x.clone()
    return torch.ops.kindred.lora_dropout(x2, float(p), _seed_tensor(seed, None, x.device)).reshape(x.shape)
