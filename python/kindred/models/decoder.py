"""DecoderLM: one compact decoder for Llama 3.x, Mistral / NeMo, Qwen3, Phi-3 / Phi-4, Gemma 3 text, Qwen3
MoE and gpt-oss (their routed-experts MLP in ``moe.py``).

Module names follow transformers' (``model.layers.N.self_attn.q_proj``, ``mlp.gate_proj``, ``lm_head``), so
state dicts, PEFT target names and adapters carry over. Phi-3/4's fused ``qkv_proj`` and ``gate_up_proj``
are split into q/k/v_proj and gate/up_proj at load time: every family exposes the same seven linears.

Family differences, all read from the DecoderConfig: q/k RMSNorm per head (Qwen3, Gemma 3); Gemma's
(1 + w) norms in float32, four per layer, √d embedding scale, query_pre_attn_scalar, local rope base and
sliding-window layers; partial rotary (Phi-4-mini); final logit softcapping when configured; attention
sinks (gpt-oss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._ops.fused import add_rms_norm, rope_qk_cache, silu_mul, swiglu
from .._ops.fused import rope as _rope  # the autograd op; `rope` names the (cos, sin) tables here
from .._ops.norm import rms_norm
from ..errors import KindredValueError
from ..nn.stacked import stacked_decode
from .attention import (
    AttentionContext,
    attend,
    check_backend,
    document_ids,
    pick_backend,
    varlen_attend,
    varlen_reason,
)
from .attention import positions_from_cu_seqlens as _positions
from .config import LINEAR, SLIDING, DecoderConfig
from .linear_attention import GatedDeltaNet
from .moe import MoeBlock, router_aux_loss
from .offload import HostBytes, Offloader
from .rope import RotaryEmbedding, apply_rotary


def on_kernels(x: torch.Tensor) -> bool:
    """Whether a training forward's elementwise steps run through kindred's kernels (RMSNorm, rotary,
    SwiGLU: one launch each, forward and backward) rather than torch's ops: on CUDA, for the dtypes the
    kernels take, with autograd on. The CPU and inference (prefill, the unfused decode step that the fused
    one is held to) keep torch's ops, so their results stay bitwise what they were."""
    return x.is_cuda and x.dtype != torch.float64 and torch.is_grad_enabled()


class RMSNorm(nn.Module):
    """x / rms(x) · w, or · (1 + w) for Gemma, normalized in float32 as transformers does (Gemma exactly;
    the Llama-style scale is applied before the one rounding, transformers' after: last-bit differences).
    On CUDA one kernel reads and writes the activations' dtype (``_ops.norm.rms_norm``)."""

    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.eps, self.gemma = eps, gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm normalizes and scales in float32 and rounds once to x's dtype: one fused kernel on CUDA
        # instead of seven passes (transformers rounds before its Llama-style scale: a last-bit difference).
        shape = (x.shape[-1],)
        if on_kernels(x):
            return rms_norm(x, self.weight, self.eps, 1.0 if self.gemma else 0.0)
        if self.gemma:
            return F.rms_norm(x.float(), shape, 1.0 + self.weight.float(), self.eps).type_as(x)
        return F.rms_norm(x, shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}" + (", gemma (1 + w)" if self.gemma else "")


class KVCache:
    """Keys and values of every layer for generation: [B, Hkv, capacity, D] each, filled left to right."""

    def __init__(self, config: DecoderConfig, batch: int, capacity: int, dtype: torch.dtype, device):
        shape = (batch, config.num_kv_heads, capacity, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = (
            layer_idx,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
        )
        self.sliding = c.layer_types[layer_idx] == SLIDING
        self.window = c.sliding_window if self.sliding else None
        self.scale = c.attn_scale
        bias = c.attention_bias
        self.gated = c.attn_output_gate  # Qwen3.5: q_proj also emits a sigmoid gate per head, after its query
        q_out = c.num_heads * c.head_dim * (2 if self.gated else 1)
        self.q_proj = nn.Linear(c.hidden_size, q_out, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.gemma_norm)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.gemma_norm)
        # gpt-oss: a learned logit per head that joins every softmax and takes probability, not a value
        self.sinks = nn.Parameter(torch.zeros(c.num_heads)) if c.attention_sinks else None

    def forward(self, x, rope, ctx: AttentionContext, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x)
        if self.gated:
            q, gate = q.view(b, t, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        rotate = _rope if on_kernels(q) else apply_rotary
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if ctx.varlen is not None and cache is None:  # the rows as one packed row: [B·T, H, D], no transposes
            cu, longest = ctx.varlen
            q, k, v = (y.reshape(b * t, y.shape[2], self.head_dim) for y in (q, k, v))
            out = varlen_attend(q, k, v, cu, longest, self.window, self.scale)
            out = out.view(b, t, self.num_heads, self.head_dim)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)
            out = attend(q, k, v, ctx, self.window, self.scale, self.sinks).transpose(1, 2)
        if self.gated:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))

    def forward_decode(self, x, rope, ctx: AttentionContext, cache) -> torch.Tensor:
        """forward for one token per row against a static cache in decode mode (``cache.decode_buffers``):
        q, k and v from one stacked 4-bit GEMV where the layers allow, then q/k norm, rotary and the cache
        write in one kernel (``rope_qk_cache``)."""
        b = x.shape[0]
        x2 = x.reshape(b, -1)
        projs = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = stacked_decode(projs, x2) or [p(x2) for p in projs]
        norms = (self.q_norm.weight, self.k_norm.weight) if hasattr(self, "q_norm") else (None, None)
        eps = self.q_norm.eps if hasattr(self, "q_norm") else 1e-6
        cache_k, cache_v, slots = cache.decode_buffers(self.layer_idx)
        cos, sin = rope
        q = rope_qk_cache(q, k, v, *norms, eps, cos[:, 0], sin[:, 0], cache_k, cache_v, slots)
        k, v = cache.attended(self.layer_idx)
        out = attend(q[:, :, None], k, v, ctx, self.window, self.scale, self.sinks)  # [B, H, 1, D]
        return self.o_proj(out.reshape(b, 1, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        c = config
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act = c.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        if self.act == "silu" and on_kernels(g):
            return self.down_proj(swiglu(g, self.up_proj(x)))
        if self.act == "silu":
            g = F.silu(g)
        else:
            g = F.gelu(g, approximate="tanh" if self.act == "gelu_pytorch_tanh" else "none")
        return self.down_proj(g * self.up_proj(x))

    def forward_decode(self, x: torch.Tensor) -> torch.Tensor:
        """forward for a few rows: gate and up from one stacked 4-bit GEMV where the layers allow, SiLU and
        the product in one kernel (``silu_mul``); other activations as forward."""
        if self.act != "silu":
            return self.forward(x)
        g, u = stacked_decode((self.gate_proj, self.up_proj), x) or (self.gate_proj(x), self.up_proj(x))
        shape = g.shape
        return self.down_proj(silu_mul(g.reshape(-1, shape[-1]), u.reshape(-1, shape[-1])).view(shape))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        c, g = config, config.gemma_norm
        self.gemma = c.sandwich_norms
        self.sliding = c.layer_types[layer_idx] == SLIDING
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, g)
        if c.layer_types[layer_idx] == LINEAR:  # Qwen3.5's gated DeltaNet token mixer
            self.linear_attn = GatedDeltaNet(c)
        else:
            self.self_attn = Attention(c, layer_idx)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, g)
        self.mlp = MoeBlock(c) if c.moe_layers and c.moe_layers[layer_idx] else MLP(c)
        if self.gemma:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, g)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, g)

    def forward(self, h, rope, ctx: AttentionContext, cache: KVCache | None = None) -> torch.Tensor:
        x = self.input_layernorm(h)
        if hasattr(self, "linear_attn"):
            if cache is not None:  # a KV cache holds no recurrent state: decoding would silently restart it
                raise KindredValueError(
                    "Qwen3.5's linear-attention layers need a recurrent-state cache, which kindred's KV "
                    "cache does not hold yet"
                )
            attn = self.linear_attn(x, ctx.cu_seqlens)
        else:
            attn = self.self_attn(x, rope, ctx, cache)
        if self.gemma:  # sandwich norms: the output of each block is normalized before the residual add
            h = h + self.post_attention_layernorm(attn)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_decode(self, h, delta, rope, ctx: AttentionContext, cache):
        """forward of a decode step through the fused ops (``DecoderModel.can_fuse_decode``): the residual
        add of the block before (``delta``, None for the first layer) joins this block's first norm.
        Returns (h, delta): the residual stream and what is still to be added to it."""
        norm = self.input_layernorm
        x, h = (norm(h), h) if delta is None else add_rms_norm(delta, h, norm.weight, norm.eps)
        attn = self.self_attn.forward_decode(x, rope, ctx, cache)
        norm = self.post_attention_layernorm
        x, h = add_rms_norm(attn, h, norm.weight, norm.eps)
        return h, self.mlp.forward_decode(x) if isinstance(self.mlp, MLP) else self.mlp(x)


CHECKPOINT_POLICIES = ("full", "offload")


class DecoderModel(nn.Module):
    """Embeddings, layers and the final norm (transformers' ``model`` submodule)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.gemma_norm)
        self.gradient_checkpointing = False
        self.checkpoint_policy = "full"
        self.offloaded = HostBytes()  # host memory of the "offload" policy's layer inputs
        self.init_rotary(None if self.embed_tokens.weight.is_meta else self.embed_tokens.weight.device)

    def init_rotary(self, device) -> None:
        """(Re)build the rotary tables on ``device`` (they are computed, never loaded)."""
        c = self.config
        self.rotary = RotaryEmbedding(c.rope, c.head_dim, device)
        self.rotary_local = (
            RotaryEmbedding(c.rope_local, c.head_dim, device) if c.rope_local != c.rope else None
        )

    @property
    def checkpoint_policy(self) -> str:
        """What ``gradient_checkpointing`` keeps of each layer for its recompute: "full" (its input, on the
        device) or "offload" (its input, in host memory: ``offload.py``)."""
        return self._checkpoint_policy

    @checkpoint_policy.setter
    def checkpoint_policy(self, value: str) -> None:
        if value not in CHECKPOINT_POLICIES:
            raise KindredValueError(
                f"checkpoint_policy must be one of {', '.join(CHECKPOINT_POLICIES)}, got {value!r}"
            )
        self._checkpoint_policy = value

    @property
    def can_fuse_decode(self) -> bool:
        """Whether decode steps may run through the fused ops (``AttentionContext.fused``): every layer
        softmax attention with plain pre-norms (not Gemma's (1 + w) sandwich norms, Qwen3.5's linear or gated
        attention)."""
        c = self.config
        return not (c.gemma_norm or c.sandwich_norms or c.attn_output_gate or LINEAR in c.layer_types)

    def forward(self, input_ids, position_ids, ctx: AttentionContext, cache: KVCache | None = None):
        h = self.embed_tokens(input_ids)
        if self.config.embed_scale is not None:  # Gemma: the scale is rounded to the activations' dtype first
            h = h * torch.tensor(self.config.embed_scale, dtype=torch.float32).to(h.dtype)
        rope = self.rotary(position_ids, h.dtype)
        rope_local = self.rotary_local(position_ids, h.dtype) if self.rotary_local is not None else rope
        if ctx.fused:
            delta = None
            for layer in self.layers:
                h, delta = layer.forward_decode(h, delta, rope_local if layer.sliding else rope, ctx, cache)
            return add_rms_norm(delta, h, self.norm.weight, self.norm.eps)[0]
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        offload = Offloader(self.offloaded) if ckpt and self.checkpoint_policy == "offload" else None
        for layer in self.layers:
            r = rope_local if layer.sliding else rope
            if offload is not None:
                h = offload.checkpoint(layer, h, r, ctx)
            elif ckpt:
                h = checkpoint(layer, h, r, ctx, use_reentrant=False)
            else:
                h = layer(h, r, ctx, cache)
        return self.norm(h)


class DecoderLM(nn.Module):
    """A causal LM: ``forward(input_ids, position_ids=None, cu_seqlens=None, return_hidden=False)``.

    Build it with ``kindred.models.from_pretrained``, ``from_config`` or ``from_gguf``. ``attn_backend``
    ("auto", "sdpa", "flex", "varlen") picks the attention path; ``model.model.gradient_checkpointing = True``
    recomputes each layer in the backward pass from its saved input, kept on the device
    (``model.model.checkpoint_policy = "full"``, the default) or in host memory (``"offload"``: the input
    is copied out on a side stream and prefetched back one layer ahead; ``model.model.offloaded`` counts
    its host bytes, now and at peak).
    """

    def __init__(self, config: DecoderConfig, attn_backend: str = "auto"):
        super().__init__()
        check_backend(attn_backend)
        self.config = config
        self.attn_backend = attn_backend
        # checkpoint tensors the decoder does not use (a vision tower): name -> file, for export to copy back
        self.kept_aside: dict[str, str] = {}
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_hidden: bool = False,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (softcapped if configured), or the final hidden states [B, T, hidden].

        input_ids: integer [B, T]. position_ids: [B, T]; default 0.. per row, or per document when
        cu_seqlens is given. cu_seqlens: int32/int64 [n_docs + 1] offsets of the documents packed in a
        single row (B = 1), starting at 0 and ending at T; a token attends only within its document.
        max_seqlen: the longest document when the caller knows it on the host (the "varlen" backend sizes
        its grid by it; default T, never read from the device).
        """
        ids = self._check_ids(input_ids)
        b, t = ids.shape
        if max_seqlen is not None and not (isinstance(max_seqlen, int) and 0 < max_seqlen <= t):
            raise KindredValueError(f"max_seqlen must be an integer in [1, {t}], got {max_seqlen!r}")
        doc_ids = None
        if cu_seqlens is not None:
            self._check_cu_seqlens(cu_seqlens, b, t, ids.device)
            doc_ids = document_ids(cu_seqlens, t)
            if position_ids is None:
                position_ids = _positions(cu_seqlens, t)[None]
        position_ids = self._check_positions(position_ids, b, t, ids.device, past=0)
        needs_mask = doc_ids is not None or self.config.sliding_window is not None
        c, dtype = self.config, self.model.embed_tokens.weight.dtype
        window = c.sliding_window is not None
        why = varlen_reason(self.attn_backend, ids.device, dtype, c.head_dim, c.attention_sinks, window)
        backend = pick_backend(self.attn_backend, ids.device, needs_mask, cached=False, varlen=why)
        ctx = AttentionContext(t, 0, ids.device, doc_ids, backend, cu_seqlens=cu_seqlens)
        if backend == "varlen":
            rows = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=ids.device)
            cu = rows if cu_seqlens is None else cu_seqlens.to(torch.int32)
            ctx.varlen = (cu, t if max_seqlen is None else max_seqlen)
        hidden = self.model(ids, position_ids, ctx)
        return hidden if return_hidden else self.logits(hidden)

    def router_aux_loss(self) -> torch.Tensor:
        """The MoE load-balancing loss of the last training-mode forward (0 for a dense model); the trainer
        adds ``config.router_aux_loss_coef`` times it, as transformers does with output_router_logits."""
        return router_aux_loss(self)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head(hidden), with the final softcap cap·tanh(x / cap) when the config has one."""
        x = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return x if cap is None else torch.tanh(x / cap) * cap

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prompt plus up to ``max_new_tokens`` tokens [B, T + n], decoded with a KV cache.

        temperature 0 is greedy; otherwise tokens are sampled (optionally from the top_k / top_p nucleus)
        with ``generator``. A row stops at an end token (default: the config's eos ids) and is padded with
        it while other rows go on; generation ends when every row has stopped.
        """
        ids = self._check_ids(input_ids)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise KindredValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if temperature < 0:
            raise KindredValueError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise KindredValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None and top_k < 1:
            raise KindredValueError(f"top_k must be >= 1, got {top_k}")
        eos = (
            self.config.eos_token_ids
            if eos_token_id is None
            else ((eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
        )
        b, t = ids.shape
        dtype = self.model.embed_tokens.weight.dtype
        cache = KVCache(self.config, b, t + max_new_tokens, dtype, ids.device)
        eos_t = torch.tensor(eos, dtype=ids.dtype, device=ids.device)
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        out, step = [ids], ids
        rope = self.config.rope
        switch = rope.original_max_position_embeddings if rope.rope_type == "longrope" else None
        for _ in range(max_new_tokens):
            if switch is not None and cache.length <= switch < cache.length + step.shape[1]:
                # longrope changes every position's frequencies past the original context: re-encode all
                # (as transformers' Phi-3 does), so the cache never mixes short- and long-factor keys.
                cache.length, step = 0, torch.cat(out, dim=1)
            logits = self._step(step, cache)[:, -1].float()
            nxt = self._choose(logits, temperature, top_k, top_p, generator)
            if eos:
                nxt = torch.where(done, eos_t[0], nxt)
                done = done | torch.isin(nxt, eos_t)
            out.append(nxt[:, None])
            step = nxt[:, None]
            if eos and bool(done.all()):
                break
        return torch.cat(out, dim=1)

    def _step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        b, t = ids.shape
        past = cache.length
        pos = torch.arange(past, past + t, device=ids.device)[None].expand(b, t)
        ctx = AttentionContext(
            t, past, ids.device, None, pick_backend(self.attn_backend, ids.device, True, True)
        )
        hidden = self.model(ids, pos, ctx, cache)
        cache.length += t
        return self.logits(hidden)

    @staticmethod
    def _choose(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    def _check_ids(self, input_ids) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = (
                tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            )
            raise KindredValueError(f"input_ids must be a 2-D [batch, seq] tensor, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise KindredValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise KindredValueError("input_ids must hold at least one token per row")
        weight_device = self.model.embed_tokens.weight.device
        if input_ids.device != weight_device:
            raise KindredValueError(f"input_ids is on {input_ids.device} but the model is on {weight_device}")
        return input_ids.long()

    @staticmethod
    def _check_positions(position_ids, b, t, device, past) -> torch.Tensor:
        if position_ids is None:
            return torch.arange(past, past + t, device=device)[None].expand(b, t)
        if not isinstance(position_ids, torch.Tensor) or position_ids.shape not in ((b, t), (1, t)):
            got = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else position_ids
            raise KindredValueError(f"position_ids must have shape ({b}, {t}) like input_ids, got {got}")
        return position_ids.to(device)

    @staticmethod
    def _check_cu_seqlens(cu, b, t, device) -> None:
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
            raise KindredValueError("cu_seqlens must be a 1-D tensor of document offsets [n_docs + 1]")
        if cu.dtype not in (torch.int32, torch.int64):
            raise KindredValueError(f"cu_seqlens must be int32 or int64, got {cu.dtype}")
        if cu.device != device:
            raise KindredValueError(f"cu_seqlens is on {cu.device} but input_ids on {device}")
        if b != 1:
            raise KindredValueError(
                f"cu_seqlens packs documents into one row: input_ids must be [1, T], got B={b}"
            )
        # Values are checked where that costs no device sync (on the CPU).
        if cu.device.type == "cpu" and (
            int(cu[0]) != 0 or int(cu[-1]) != t or bool((cu[1:] < cu[:-1]).any())
        ):
            raise KindredValueError(
                f"cu_seqlens must rise from 0 to the sequence length {t}, got {cu.tolist()[:8]}..."
            )
