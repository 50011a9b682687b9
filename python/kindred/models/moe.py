"""Routed experts: a float32 top-k router, tokens grouped per expert, and one grouped GEMM per projection.

Names follow transformers v5: ``mlp.gate`` (Qwen3 MoE) or ``mlp.router`` (gpt-oss),
``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``; kindred holds both projections as
[experts, out, in] ([E, 2I, H], [E, H, I]). A layer's expert weights are frozen, held dense or 4-bit (one
NF4 / INT4g tensor of [E · out, in] rows per projection); for a forward or a dX they are dequantized into
one workspace shared by all layers and multiplied by the token groups in one grouped GEMM
(``torch._grouped_mm`` on CUDA for bf16, a loop of GEMMs over the groups elsewhere). Only the 4-bit weights
are kept for the backward pass, never the workspace.

LoRA on the experts (:func:`apply_expert_lora`) follows PEFT's ``target_parameters`` adapters of the same
3-D parameters: per expert, ΔW_e = B_e A_e · scaling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KindredValueError
from ..weights import Int4gWeight, NF4Weight
from .config import DecoderConfig

EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")
_WORKSPACE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, shared by every expert layer on ``device``."""
    key = (device, dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACE.pop(key, None)
        buf = _WORKSPACE[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _use_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and w.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
        and x.shape[-1] % 8 == 0
        and w.shape[-1] % 8 == 0
    )


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row group g of x [T, K] (rows offsets[g-1]..offsets[g]) times w[g] [K, N]: [T, N].

    offsets: int32 [G], the cumulative group ends (the last is T). Differentiable in x and w.
    """
    if _use_grouped_mm(x, w):
        return torch._grouped_mm(x, w, offs=offsets)
    parts, start = [], 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            parts.append(x[start:end] @ w[g])
        start = end
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[-1])


class ExpertWeight(nn.Module):
    """One frozen projection of all experts, [E, out, in], dense or 4-bit; ``dense(dtype)`` gives it whole
    (4-bit: dequantized into the shared workspace, valid until the next expert weight is dequantized)."""

    def __init__(self, weight: torch.Tensor | NF4Weight | Int4gWeight, experts: int):
        super().__init__()
        self.experts = experts
        if isinstance(weight, torch.Tensor):
            if weight.dim() != 3 or weight.shape[0] != experts:
                raise KindredValueError(
                    f"expert weight must be [{experts}, out, in], got {tuple(weight.shape)}"
                )
            self.shape = tuple(weight.shape)
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.quant = None
            return
        rows, k = weight.shape[0], weight.shape[-1]
        if rows % experts:
            raise KindredValueError(
                f"4-bit expert weight has {rows} rows, not a multiple of {experts} experts"
            )
        self.shape = (experts, rows // experts, k)
        self.weight = None
        self._set_quantized(weight)

    def set_quantized(self, q: NF4Weight | Int4gWeight) -> None:
        """Hold ``q`` ([E · out, in]) instead of the dense weight."""
        if tuple(q.shape) != (self.shape[0] * self.shape[1], self.shape[2]):
            raise KindredValueError(f"4-bit expert weight has shape {tuple(q.shape)}, expected {self.shape}")
        self._parameters.pop("weight", None)
        self.weight = None
        self._set_quantized(q)

    def _set_quantized(self, q: NF4Weight | Int4gWeight) -> None:
        self.quant = "nf4" if isinstance(q, NF4Weight) else "int4g"
        self._fields = tuple(q.tensors())
        for name, t in q.tensors().items():
            self.register_buffer(f"_q_{name}", t, persistent=False)
        self._meta = (
            {"blocksize": q.blocksize, "shape": q.shape, "dtype": q.dtype}
            if self.quant == "nf4"
            else {"group_size": q.group_size, "dtype": q.dtype}
        )

    @property
    def quantized(self) -> NF4Weight | Int4gWeight | None:
        if self.quant is None:
            return None
        t = {k: getattr(self, f"_q_{k}") for k in self._fields}
        if self.quant == "nf4":
            optional = {k: t.get(k) for k in ("nested_absmax", "nested_code", "offset")}
            return NF4Weight(t["packed"], t["absmax"], **optional, **self._meta)
        return Int4gWeight(t["packed"], t["scales"], t["zeros"], **self._meta)

    @property
    def device(self) -> torch.device:
        return self.weight.device if self.weight is not None else self._q_packed.device

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if self.weight is not None:
            return self.weight.to(dtype)
        out = _workspace(math.prod(self.shape), dtype, self.device).view(self.shape[0] * self.shape[1], -1)
        self.quantized.dequantize(out=out)
        return out.view(self.shape)

    def extra_repr(self) -> str:
        return f"experts={self.shape[0]}, out={self.shape[1]}, in={self.shape[2]}, " + (
            f"quant={self.quant}" if self.quant else f"dtype={self.weight.dtype}"
        )


class _ExpertsLinear(torch.autograd.Function):
    """y = x_g · W_gᵀ per token group g, differentiable in x only; W is re-dequantized for the backward."""

    @staticmethod
    def forward(ctx, x, offsets, weight: ExpertWeight):
        ctx.weight = weight
        ctx.save_for_backward(offsets)
        return grouped_mm(x, weight.dense(x.dtype).transpose(1, 2), offsets)

    @staticmethod
    def backward(ctx, dy):
        (offsets,) = ctx.saved_tensors
        dx = grouped_mm(dy.contiguous(), ctx.weight.dense(dy.dtype), offsets)
        return dx, None, None


class ExpertLora(nn.Module):
    """LoRA of one expert projection: ΔW_e = B_e A_e · scaling, A [E, r, in] (random), B [E, out, r] (0)."""

    def __init__(self, weight: ExpertWeight, r: int, alpha: float, rslora: bool = False):
        super().__init__()
        experts, out_f, in_f = weight.shape
        self.r, self.lora_alpha = r, alpha
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.use_rslora = rslora
        a = torch.empty(experts, r, in_f, device=weight.device, dtype=torch.float32)
        for e in range(experts):  # PEFT's default init of lora_A (Kaiming uniform), per expert
            nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(experts, out_f, r, device=weight.device))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return (
            grouped_mm(grouped_mm(x, a.transpose(1, 2), offsets), b.transpose(1, 2), offsets) * self.scaling
        )


class Experts(nn.Module):
    """The experts of one layer: gated MLPs on the tokens routed to each, weighted and summed.

    Qwen3 MoE: silu(gate) · up with gate_up_proj = [gate; up]. gpt-oss: biases, gate and up interleaved
    (rows 2j and 2j + 1), (clamp(up, ±limit) + 1) · g · σ(alpha · g) with g = min(gate, limit).
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        c = config
        e, i, h = c.num_experts, c.moe_intermediate_size, c.hidden_size
        self.num_experts, self.intermediate = e, i
        self.gpt_oss, self.alpha, self.limit = c.gpt_oss_moe, c.swiglu_alpha, c.swiglu_limit
        self.gate_up_proj = ExpertWeight(torch.empty(e, 2 * i, h), e)
        self.down_proj = ExpertWeight(torch.empty(e, h, i), e)
        if self.gpt_oss:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i), requires_grad=False)
            self.down_proj_bias = nn.Parameter(torch.zeros(e, h), requires_grad=False)
        self.lora = nn.ModuleDict()  # projection name -> ExpertLora (apply_expert_lora)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if not self.gpt_oss:
            gate, up = h.split(self.intermediate, dim=-1)
            return F.silu(gate) * up
        gate, up = h[..., ::2].clamp(max=self.limit), h[..., 1::2].clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def peft_parameter_adapters(self) -> dict[str, tuple]:
        """This layer's expert LoRA as PEFT saves ``target_parameters`` adapters: {module path relative to
        this one: (parameter, r, alpha, rslora, {"lora_A": [r · E, in], "lora_B": [out, r · E]})}. PEFT
        nests one wrapper per parameter: gate_up_proj is the inner one (``base_layer``)."""
        out = {}
        for proj in EXPERT_PROJECTIONS:
            if proj in self.lora:
                lora = self.lora[proj]
                e, n, r = lora.lora_B.shape
                a = lora.lora_A.reshape(e * r, -1)  # PEFT reads A as [E, r, in], B as [out, r, E]
                b = lora.lora_B.permute(1, 2, 0).reshape(n, r * e)
                rel = "base_layer" if proj == "gate_up_proj" and len(self.lora) == 2 else ""
                out[rel] = (proj, lora.r, lora.lora_alpha, lora.use_rslora, {"lora_A": a, "lora_B": b})
        return out

    def _linear(self, name: str, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        y = _ExpertsLinear.apply(x, offsets, getattr(self, name))
        if name in self.lora:
            y = y + self.lora[name](x, offsets)
        return y

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [T, H]; weights, experts [T, k] (routing weight and expert id of each token's k choices)."""
        k = experts.shape[1]
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)  # the T·k (token, choice) pairs grouped by expert
        token = order // k
        offsets = torch.bincount(flat, minlength=self.num_experts).cumsum(0).to(torch.int32)
        xs = x[token]
        h = self._linear("gate_up_proj", xs, offsets)
        if self.gpt_oss:
            rows = flat[order]  # the expert of each grouped row
            h = h + self.gate_up_proj_bias[rows].to(h.dtype)
        ys = self._linear("down_proj", self._act(h), offsets)
        if self.gpt_oss:
            ys = ys + self.down_proj_bias[rows].to(ys.dtype)
        ys = ys * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, ys)


class Router(nn.Module):
    """Routing in float32. Qwen3 MoE: top-k of softmax(x Wᵀ), renormalized over the k with norm_topk_prob;
    gpt-oss: softmax over the k largest of x Wᵀ + b."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.experts_per_token, config.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.gpt_oss_moe else None

    def forward(self, x: torch.Tensor):
        """(routing weights [T, k] in x's dtype, expert ids [T, k], probabilities f32 [T, E])."""
        bias = None if self.bias is None else self.bias.float()
        logits = F.linear(x.float(), self.weight.float(), bias)
        probs = logits.softmax(-1)
        if self.bias is not None:
            top, ids = logits.topk(self.top_k, dim=-1)
            return top.softmax(-1).to(x.dtype), ids, probs
        top, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top = top / top.sum(-1, keepdim=True)
        return top.to(x.dtype), ids, probs


class MoeBlock(nn.Module):
    """Router + experts (transformers' ``mlp``). In training mode it keeps the statistics of the last
    forward that :meth:`aux_stats` returns for the load-balancing loss (a few [E] tensors per layer)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.router_name = "router" if config.gpt_oss_moe else "gate"  # transformers' module names
        self.add_module(self.router_name, Router(config))
        self.experts = Experts(config)
        self.stats: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        weights, ids, probs = getattr(self, self.router_name)(x)
        if self.training and torch.is_grad_enabled():
            counts = torch.zeros(probs.shape[1], device=x.device).index_add_(
                0, ids.reshape(-1), torch.ones(ids.numel(), device=x.device)
            )
            self.stats = (counts, probs.sum(0), x.shape[0])
        return self.experts(x, weights, ids).reshape(shape)


def router_aux_loss(model: nn.Module) -> torch.Tensor:
    """Switch Transformer's load-balancing loss over the MoE layers' last training forward, as transformers'
    ``load_balancing_loss_func`` computes it: E · Σ_e (share of the top-k picks of e) · (mean probability
    of e), both pooled over layers and tokens. Zero when no MoE layer has run in training mode."""
    blocks = [m for m in model.modules() if isinstance(m, MoeBlock) and m.stats is not None]
    if not blocks:
        return torch.zeros(())
    counts = sum(b.stats[0] for b in blocks)
    probs = sum(b.stats[1] for b in blocks)
    rows = sum(b.stats[2] for b in blocks)
    return (counts / rows * (probs / rows)).sum() * counts.shape[0]


def apply_expert_lora(model: nn.Module, r: int = 8, alpha: float = 8.0, rslora: bool = False) -> list[str]:
    """LoRA on every expert projection of every MoE layer (``lora.experts: true``); returns the adapted
    parameter names (``model.layers.N.mlp.experts.gate_up_proj`` ...). The new A and B are trainable."""
    if not isinstance(r, int) or r < 1:
        raise KindredValueError(f"r must be a positive integer, got {r!r}")
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            for proj in EXPERT_PROJECTIONS:
                module.lora[proj] = ExpertLora(getattr(module, proj), r, alpha, rslora)
                names.append(f"{name}.{proj}")
    if not names:
        raise KindredValueError(f"{type(model).__name__} has no experts to adapt (not a MoE model)")
    return names
