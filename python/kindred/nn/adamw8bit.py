"""AdamW with 8-bit moments (``train.optimizer: adamw8bit``): the LoRA masters' two fp32 moments (8 bytes a
parameter) kept as one byte each plus a float32 scale per block of BLOCK values, 2.03 bytes a parameter.

Each block of a moment is divided by its largest magnitude and every value stored as the index of the
nearest entry of a 256-entry dynamic map (an exponent in unary, then a linear fraction: fine steps near zero,
where Adam's second moments live, and coarse ones near 1): the signed map for the first moment, the unsigned
one (the sign bit spent on the fraction) for the second, whose values are never negative. A step dequantizes
a tensor's moments to float32, applies torch's AdamW update to them and to the fp32 master (decoupled weight
decay, bias corrections), and quantizes them back; the master and its gradient stay fp32.
"""

from __future__ import annotations

import math

import torch

from ..errors import KindredValueError

BLOCK = 256  # values sharing one scale
_EXPONENTS = 7  # levels of the dynamic map: magnitudes 10^-6 .. 1
_MAPS: dict[tuple[bool, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted float32 values of the dynamic map. Level i (0 .. 6) holds 2^i fractions (2^(i + 1)
    unsigned): the midpoints of an even split of [0.1, 1], times 10^(i − 6); then their negatives (signed),
    0 and 1. The signed map is the one bitsandbytes quantizes NF4's absmax with (``ops.DYNAMIC_MAP``)."""
    values = [0.0, 1.0]
    for level in range(_EXPONENTS):
        n = 2 ** (level if signed else level + 1)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (level - (_EXPONENTS - 1))).tolist()
        values += mids + ([-m for m in mids] if signed else [])
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def _tables(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the map, the midpoints between its neighbours) on ``device``, built once."""
    key = (signed, device)
    if key not in _MAPS:
        table = dynamic_map(signed).to(device)
        _MAPS[key] = (table, (table[1:] + table[:-1]) / 2)
    return _MAPS[key]


def quantize_blocks(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [n], absmax float32 [ceil(n / BLOCK)]) of a flat float32 tensor."""
    _, mids = _tables(signed, x.device)
    n = x.numel()
    blocks = math.ceil(n / BLOCK)
    padded = torch.nn.functional.pad(x, (0, blocks * BLOCK - n)).view(blocks, BLOCK)
    absmax = padded.abs().amax(dim=1)
    scaled = padded / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    codes = torch.bucketize(scaled, mids).to(torch.uint8)
    return codes.view(-1)[:n].clone(), absmax


def dequantize_blocks(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """The flat float32 values ``quantize_blocks`` stored."""
    table, _ = _tables(signed, codes.device)
    n = codes.numel()
    values = table[codes.long()]
    scale = absmax.repeat_interleave(BLOCK)[:n]
    return values * scale


def state_nbytes(numel: int) -> list[int]:
    """Device bytes of each moment tensor AdamW8bit keeps for a parameter of ``numel`` values (codes and
    scales of both moments; its step count lives on the host)."""
    blocks = math.ceil(numel / BLOCK)
    return [numel, 4 * blocks, numel, 4 * blocks]


def state_shapes(numel: int) -> dict[str, tuple[int, ...]]:
    """The shape of each state tensor AdamW8bit keeps for a parameter of ``numel`` values."""
    blocks = math.ceil(numel / BLOCK)
    return {"step": (), "exp_avg": (numel,), "exp_avg_absmax": (blocks,), "exp_avg_sq": (numel,),
            "exp_avg_sq_absmax": (blocks,)}  # fmt: skip


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments) with both moments
    stored in 8 bits per value (module docstring); for float32 parameters."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if not lr > 0 or not eps > 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise KindredValueError(
                f"AdamW8bit needs lr > 0, eps > 0, weight_decay >= 0 and betas in [0, 1), got lr={lr}, "
                f"eps={eps}, weight_decay={weight_decay}, betas={tuple(betas)}"
            )
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise KindredValueError(f"AdamW8bit updates float32 parameters, got {p.dtype}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    zeros = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"], state["exp_avg_absmax"] = quantize_blocks(zeros, signed=True)
                    state["exp_avg_sq"], state["exp_avg_sq_absmax"] = quantize_blocks(zeros, signed=False)
                m = dequantize_blocks(state["exp_avg"], state["exp_avg_absmax"], signed=True)
                v = dequantize_blocks(state["exp_avg_sq"], state["exp_avg_sq_absmax"], signed=False)
                g = p.grad.reshape(-1)
                state["step"] += 1
                t = float(state["step"])
                p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
                p.view(-1).addcdiv_(m, denom, value=-lr / (1 - b1**t))
                state["exp_avg"], state["exp_avg_absmax"] = quantize_blocks(m, signed=True)
                state["exp_avg_sq"], state["exp_avg_sq_absmax"] = quantize_blocks(v, signed=False)
        return loss
