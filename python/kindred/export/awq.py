"""AWQ (activation-aware weight quantization, arXiv 2306.00978) of a dense DecoderLM to INT4g, one decoder
block at a time, calibrated on the user's own chats rendered with the training template.

Per block, on the calibration tokens the block actually sees (the previous blocks' 16-bit outputs):

1. Scale search for each scaling group — ``input_layernorm → q,k,v`` (judged on the attention output),
   ``v_proj → o_proj`` (only without GQA, where their shapes match), the MLP's input norm ``→ gate,up``
   (judged on the MLP output), ``up_proj → down_proj``: per input channel
   ``s = mean|x|^α / mean|Ŵ|^(1−α)`` (Ŵ: |W| over its group's max), normalized by √(max·min), for α on a
   grid of ``n_grid`` points in [0, 1]; the α whose fake-quantized weights Q(W·s)/s give the lowest
   output MSE wins. ``s`` is folded into the preceding op (the norm's weight — Gemma's ``1 + w`` — or the
   previous linear's rows) and multiplied into the group's columns: the 16-bit function is unchanged.
2. Clipping search for every linear but q and k: per (row, group) the clamp ``max|w|·(1 − i/n_grid)``,
   i < ``max_shrink·n_grid``, with the lowest error of that group's partial outputs on
   ``clip_tokens`` sampled tokens.
3. INT4g quantization (kindred's format: AWQ's rounding, fp16 scales), the linear replaced by a
   Linear4bit — what ``awq_formats`` writes as compressed-tensors or AutoAWQ GEMM, losslessly.

Fake quantization in the searches is kindred's own INT4g quantizer (the one format definition). The model
stays on the host; one block at a time is moved to ``device`` with the calibration activations it needs,
the tokens used for the searches capped to fit ``max_gpu_memory``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import KindredValueError
from ..models import LINEAR_NAMES, DecoderLM
from ..models.attention import AttentionContext, pick_backend
from ..nn import Linear4bit, LoraLinear
from ..ops.quant import INT4G_GROUPS, quantize_int4g

DEFAULT_SAMPLES, DEFAULT_SEQ_LEN = 128, 512  # AutoAWQ's calibration defaults


@dataclass
class AWQSettings:
    group_size: int = 128
    n_grid: int = 20
    max_shrink: float = 0.5
    clip: bool = True
    clip_tokens: int = 512
    max_gpu_memory: int | None = None  # bytes; None: no cap (CPU: the host holds everything anyway)
    chunk_rows: int = 8  # calibration sequences per forward chunk


@dataclass
class AWQReport:
    layers: int
    seconds: float
    layer_seconds: list[float] = field(default_factory=list)
    search_tokens: int = 0
    peak_gpu_bytes: int | None = None


def check_awq_shapes(model: DecoderLM, group_size: int) -> None:
    """Every projection must split into whole groups and pack 8 rows to an int32; else KindredValueError
    naming the layer, its shape and the fix — before any work."""
    if group_size not in INT4G_GROUPS:
        raise KindredValueError(f"--group-size must be one of {INT4G_GROUPS}, got {group_size}")
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, Linear4bit, LoraLinear)) and name.rsplit(".", 1)[-1] in LINEAR_NAMES:
            n, k = m.out_features, m.in_features
            if k % group_size or n % 8:
                fits = [g for g in INT4G_GROUPS if k % g == 0]
                fix = (
                    f"use --group-size {fits[-1]}" if fits and n % 8 == 0 else "this model cannot be exported"
                )
                raise KindredValueError(
                    f"{name}: [{n}, {k}] does not split into groups of {group_size} along its {k} inputs "
                    f"(and {n} outputs must be a multiple of 8): {fix}"
                )


def _fake_quant(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Q(w): INT4g quantized and dequantized (float32), by kindred's quantizer."""
    return quantize_int4g(w.float().contiguous(), group_size).dequantize(torch.float32)


class _Block:
    """One decoder block on the device, with what its forward needs (rotary tables, attention context)."""

    def __init__(self, model: DecoderLM, index: int, device: torch.device, seq_len: int):
        self.layer = model.model.layers[index].to(device)
        self.gemma = model.config.gemma_norm
        sliding = self.layer.self_attn.sliding
        rotary = (
            model.model.rotary_local
            if sliding and model.model.rotary_local is not None
            else model.model.rotary
        )
        pos = torch.arange(seq_len, device=rotary.inv_freq.device)[None]
        dtype = model.model.embed_tokens.weight.dtype
        self.rope = tuple(t.to(device) for t in rotary(pos, dtype))
        needs_mask = model.config.sliding_window is not None
        self.ctx = AttentionContext(
            seq_len, 0, device, None, pick_backend(model.attn_backend, device, needs_mask, False)
        )

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.self_attn(x, self.rope, self.ctx)

    def mlp_norm(self) -> nn.Module:
        return self.layer.pre_feedforward_layernorm if self.gemma else self.layer.post_attention_layernorm


def _chunks(x: torch.Tensor, rows: int):
    for i in range(0, x.shape[0], rows):
        yield x[i : i + rows]


def _mse(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, ref: torch.Tensor, rows: int) -> float:
    total = 0.0
    for xc, rc in zip(_chunks(x, rows), _chunks(ref, rows), strict=True):
        total += float((fn(xc).float() - rc.float()).pow(2).sum())
    return total / ref.numel()


def _apply(fn, x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([fn(xc) for xc in _chunks(x, rows)])


def _search_scale(linears: list[nn.Linear], x: torch.Tensor, fn, s: AWQSettings) -> torch.Tensor:
    """The per-input-channel scale of one scaling group with the lowest output MSE (see the module)."""
    k = x.shape[-1]
    flat = x.reshape(-1, k)
    x_mean = torch.zeros(k, dtype=torch.float32, device=x.device)
    for c in _chunks(flat, 4096):
        x_mean += c.float().abs().sum(0)
    x_mean /= flat.shape[0]
    w = torch.cat([m.weight.detach().float() for m in linears])
    g = w.abs().reshape(-1, s.group_size)
    w_mean = (g / g.amax(1, keepdim=True).clamp_min(1e-12)).reshape(w.shape).mean(0)
    with torch.no_grad():
        ref = _apply(fn, x, s.chunk_rows)
        originals = [m.weight.data for m in linears]
        best, best_scale = math.inf, torch.ones(k, device=x.device)
        try:
            for alpha in torch.linspace(0, 1, s.n_grid).tolist():
                scale = (x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp_min(1e-4)).clamp_min(1e-4)
                scale = scale / (scale.max() * scale.min()).sqrt()
                for m, orig in zip(linears, originals, strict=True):
                    m.weight.data = (_fake_quant(orig.float() * scale, s.group_size) / scale).to(orig.dtype)
                loss = _mse(fn, x, ref, s.chunk_rows)
                if loss < best:
                    best, best_scale = loss, scale.clone()
        finally:
            for m, orig in zip(linears, originals, strict=True):
                m.weight.data = orig
    return best_scale


def _fold(prev: nn.Module, linears: list[nn.Linear], scale: torch.Tensor, gemma: bool) -> None:
    """prev's output ÷ scale, the group's inputs × scale: the block computes the same function."""
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(scale[:, None].to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(scale.to(prev.bias.dtype))
        elif gemma:  # (1 + w) / s - 1, in float32 as the norm computes
            w = prev.weight
            w.copy_(((1 + w.float()) / scale - 1).to(w.dtype))
        else:
            prev.weight.div_(scale.to(prev.weight.dtype))
        for m in linears:
            m.weight.mul_(scale[None].to(m.weight.dtype))


def _search_clip(linear: nn.Linear, x: torch.Tensor, s: AWQSettings) -> None:
    """Clamp each (row, group) of ``linear``'s weight at the shrink of its max |w| whose group partial
    outputs on ``x`` (sampled tokens) are closest to the unclamped weight's; in place."""
    w = linear.weight.detach().float()
    n, k = w.shape
    groups = k // s.group_size
    flat = x.reshape(-1, k)
    step = max(1, flat.shape[0] // s.clip_tokens)
    xs = flat[::step][: s.clip_tokens].float().reshape(-1, groups, s.group_size).transpose(0, 1)  # [G, t, g]
    rows = max(1, min(n, (1 << 26) // max(1, groups * xs.shape[1])))
    best_max = torch.empty(n, groups, device=w.device)
    for lo in range(0, n, rows):
        wc = w[lo : lo + rows].reshape(-1, groups, s.group_size)  # [o, G, g]
        org_max = wc.abs().amax(-1, keepdim=True)
        ref = torch.bmm(xs, wc.permute(1, 2, 0))  # [G, t, o]
        best_err = torch.full((wc.shape[0], groups), math.inf, device=w.device)
        chosen = org_max[..., 0].clone()
        for i in range(int(s.max_shrink * s.n_grid)):
            limit = org_max * (1 - i / s.n_grid)
            clamped = torch.maximum(torch.minimum(wc, limit), -limit)
            q = _fake_quant(clamped.reshape(wc.shape[0], k), s.group_size).reshape(wc.shape)
            err = (torch.bmm(xs, q.permute(1, 2, 0)) - ref).pow(2).mean(1).transpose(0, 1)  # [o, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            chosen = torch.where(better, limit[..., 0], chosen)
        best_max[lo : lo + rows] = chosen
    limit = best_max.repeat_interleave(s.group_size, dim=1)
    with torch.no_grad():
        linear.weight.copy_(torch.maximum(torch.minimum(w, limit), -limit).to(linear.weight.dtype))


def _capture(
    block: _Block, hidden: torch.Tensor, keep: int, s: AWQSettings, device
) -> tuple[dict, torch.Tensor]:
    """Run the block over every calibration sequence (chunks moved to ``device``); returns the inputs of its
    linears for the first ``keep`` sequences (on the device) and the block's outputs (on the host)."""
    layer = block.layer
    names = {
        "q": layer.self_attn.q_proj,
        "o": layer.self_attn.o_proj,
        "gate": layer.mlp.gate_proj,
        "down": layer.mlp.down_proj,
    }
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    state = {"rows": 0}

    def hook(key):
        def record(_module, args):
            if state["rows"] < keep:
                seen[key].append(args[0][: keep - state["rows"]].detach())

        return record

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in names.items()]
    outputs = torch.empty_like(hidden)
    try:
        with torch.no_grad():
            for i in range(0, hidden.shape[0], s.chunk_rows):
                h = hidden[i : i + s.chunk_rows].to(device)
                outputs[i : i + h.shape[0]] = layer(h, block.rope, block.ctx).to(outputs.device)
                state["rows"] += h.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return {k: torch.cat(v) for k, v in seen.items()}, outputs


def _tokens_that_fit(
    model: DecoderLM, settings: AWQSettings, seq_len: int, device: torch.device
) -> int | None:
    """Calibration sequences whose captured activations fit ``max_gpu_memory`` beside one block; None: all."""
    if settings.max_gpu_memory is None:
        return None
    c = model.config
    layer = model.model.layers[0]
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    per_token = model.model.embed_tokens.weight.element_size() * (
        4 * c.hidden_size + 2 * c.num_heads * c.head_dim + 3 * c.intermediate_size
    ) + 4 * (2 * c.hidden_size + c.intermediate_size)  # captured inputs, two outputs, float32 temporaries
    budget = settings.max_gpu_memory - 3 * layer_bytes - (256 << 20)
    rows = budget // (per_token * seq_len)
    if rows < 1:
        raise KindredValueError(
            f"--max-gpu-memory {settings.max_gpu_memory / 2**30:.1f} GiB does not hold one decoder block "
            f"({layer_bytes / 2**30:.2f} GiB) and one calibration sequence of {seq_len} tokens: raise it"
        )
    return int(rows)


def quantize_awq(
    model: DecoderLM,
    calibration: torch.Tensor,
    settings: AWQSettings | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> AWQReport:
    """AWQ of ``model`` (dense, on the host; changed in place: its projections become INT4g Linear4bit)
    calibrated on ``calibration`` (token ids [sequences, seq_len]). ``progress(layer, layers, seconds)``
    is called after each block."""
    s = settings or AWQSettings()
    if not isinstance(model, DecoderLM):
        raise KindredValueError(f"model must be a kindred DecoderLM, got {type(model).__name__}")
    if any(isinstance(m, (Linear4bit, LoraLinear)) for m in model.modules()):
        raise KindredValueError("AWQ quantizes a dense model: merge the adapter into a 16-bit base first")
    if calibration.dim() != 2 or calibration.shape[0] == 0 or calibration.dtype.is_floating_point:
        raise KindredValueError(
            f"calibration must be token ids [sequences, length], got {tuple(calibration.shape)}"
        )
    check_awq_shapes(model, s.group_size)
    device = torch.device(device) if device is not None else model.model.embed_tokens.weight.device
    seq_len = calibration.shape[1]
    keep = _tokens_that_fit(model, s, seq_len, device) or calibration.shape[0]
    keep = min(keep, calibration.shape[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        emb = model.model.embed_tokens
        hidden = emb(calibration.to(emb.weight.device))
        if model.config.embed_scale is not None:
            hidden = hidden * torch.tensor(model.config.embed_scale, dtype=torch.float32).to(hidden.dtype)
    report = AWQReport(model.config.num_layers, 0.0, search_tokens=keep * seq_len)
    host = model.model.embed_tokens.weight.device
    for i in range(model.config.num_layers):
        start = time.perf_counter()
        block = _Block(model, i, device, seq_len)
        inputs, outputs = _capture(block, hidden, keep, s, device)
        _quantize_block(block, inputs, s)
        model.model.layers[i] = block.layer.to(host)
        hidden = outputs
        del block, inputs
        report.layer_seconds.append(time.perf_counter() - start)
        if progress is not None:
            progress(i + 1, model.config.num_layers, report.layer_seconds[-1])
    report.seconds = time.perf_counter() - t0
    if device.type == "cuda":
        report.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    return report


def _quantize_block(block: _Block, inputs: dict[str, torch.Tensor], s: AWQSettings) -> None:
    layer, attn, mlp = block.layer, block.layer.self_attn, block.layer.mlp
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    groups = [(layer.input_layernorm, qkv, inputs["q"], block.attention)]
    if attn.v_proj.out_features == attn.o_proj.in_features:  # no GQA: v's rows line up with o's columns
        groups.append((attn.v_proj, [attn.o_proj], inputs["o"], attn.o_proj))
    groups.append((block.mlp_norm(), [mlp.gate_proj, mlp.up_proj], inputs["gate"], mlp))
    groups.append((mlp.up_proj, [mlp.down_proj], inputs["down"], mlp.down_proj))
    scales = [_search_scale(linears, x, fn, s) for _, linears, x, fn in groups]
    for (prev, linears, x, _), scale in zip(groups, scales, strict=True):
        _fold(prev, linears, scale, block.gemma)
        x.div_(scale.to(x.dtype))  # what the group's linears see from now on
    if s.clip:
        x_of = {
            attn.v_proj: inputs["q"],
            attn.o_proj: inputs["o"],
            mlp.gate_proj: inputs["gate"],
            mlp.up_proj: inputs["gate"],
            mlp.down_proj: inputs["down"],
        }
        for linear, x in x_of.items():
            _search_clip(linear, x, s)
    for parent, names in (
        (attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
        (mlp, ("gate_proj", "up_proj", "down_proj")),
    ):
        for name in names:
            m = getattr(parent, name)
            q = quantize_int4g(m.weight.detach().contiguous(), s.group_size)
            setattr(parent, name, Linear4bit(q, m.bias))


def round_to_nearest(model: DecoderLM, group_size: int = 128) -> DecoderLM:
    """The baseline: every projection quantized to INT4g as it is (in place), no search."""
    check_awq_shapes(model, group_size)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR_NAMES:
            parent, child = name.rsplit(".", 1)
            setattr(
                model.get_submodule(parent), child, Linear4bit.from_linear(m, "int4g", group_size=group_size)
            )
    return model
