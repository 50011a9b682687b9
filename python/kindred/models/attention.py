"""Causal attention over packed sequences and sliding windows, through torch's SDPA or FlexAttention.

A packed row holds several documents back to back (``cu_seqlens`` gives their offsets); a token attends to
earlier tokens of its own document only, and in a sliding-window layer only to the last ``window`` of them
(key index > query index − window, as transformers' ``sliding_window_overlay``). Masks are built once per
forward and shared by all layers of a kind, from device tensors, without host syncs.

Backends: "varlen" (torch's varlen flash attention over the documents' offsets: no mask and no transposes;
the default on CUDA when a mask is needed, the layers allow it (``varlen_supported``) and heads are wider
than FLEX_MAX_HEAD_DIM), "flex" (FlexAttention with a block-sparse mask, compiled; the CUDA default
otherwise, e.g. for gpt-oss's sinks),
"sdpa" (``scaled_dot_product_attention`` with a boolean [T, T] mask, or its causal kernel when no mask is
needed; the default on the CPU and for decoding with a KV cache).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import warnings

import torch
import torch.nn.functional as F

from ..errors import KindredValueError

BACKENDS = ("auto", "sdpa", "flex", "varlen")

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    HAVE_FLEX = True
except ImportError:  # torch without FlexAttention: SDPA only
    HAVE_FLEX = False
try:  # torch >= 2.9 asks for the logsumexp this way (return_lse before)
    from torch.nn.attention.flex_attention import AuxRequest

    _LSE = {"return_aux": AuxRequest(lse=True)}
except ImportError:
    _LSE = {"return_lse": True}
try:  # torch >= 2.10: flash attention over packed documents (cu_seqlens), forward and backward
    from torch.nn.attention.varlen import varlen_attn

    HAVE_VARLEN = True
    # 2.10 says causal with is_causal and has no windows; 2.11 takes window_size; 2.13 asks enable_gqa for
    # grouped-query heads (flash attention itself takes them in every version)
    _VARLEN_ARGS = frozenset(inspect.signature(varlen_attn).parameters)
except ImportError:
    HAVE_VARLEN = False
    _VARLEN_ARGS = frozenset()
VARLEN_DTYPES = (torch.float16, torch.bfloat16)
VARLEN_MAX_HEAD_DIM = 256  # flash attention's largest head size
# "auto" keeps FlexAttention up to this head size and takes varlen above it: on an H200, forward + backward
# of Qwen3-8B's 4 × 2048 rows (D = 128) took flex 1.88 ms and varlen 2.24; Gemma 3's D = 256 took flex 3.83
# and varlen 2.34 (benchmarks/results/attention.csv)
FLEX_MAX_HEAD_DIM = 128


# Each packed length and prefill bucket is one static-shape compile; past dynamo's default of 8 per function
# it silently falls back to the unfused path (the whole score matrix) for the rest of the process.
FLEX_COMPILES = 64


@functools.cache
def _compiled_flex():
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_COMPILES)
    return torch.compile(flex_attention, dynamic=False)


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Document index [total] of each token of a packed row, from offsets [n_docs + 1] (on the device)."""
    idx = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), idx, right=True)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of each token within its document [total] (0 at every document start)."""
    idx = torch.arange(total, device=cu_seqlens.device, dtype=torch.long)
    return idx - cu_seqlens.long()[document_ids(cu_seqlens, total)]


@dataclasses.dataclass
class AttentionContext:
    """What every layer of one forward needs to attend: documents, offset into a KV cache, the backend.

    ``q_len`` new queries follow ``past`` cached keys; documents (packing) apply when ``past`` is 0.
    ``lengths`` [B] (decoding against a static cache, ``q_len`` 1): row b's query sits at slot lengths[b]
    and sees slots 0..lengths[b] of the ``kv_len`` attended; later slots are masked.
    """

    q_len: int
    past: int
    device: torch.device
    doc_ids: torch.Tensor | None = None
    backend: str = "sdpa"
    lengths: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None  # the packed documents' offsets (linear attention restarts there)
    fused: bool = False  # a decode step through the fused ops (DecoderModel.can_fuse_decode)
    # the "varlen" backend: int32 document offsets over the flattened rows and the longest document (or a
    # bound on it: the kernel's grid is sized by it, blocks past a document's end exit at once)
    varlen: tuple[torch.Tensor, int] | None = None
    _masks: dict = dataclasses.field(default_factory=dict)

    @property
    def kv_len(self) -> int:
        return self.past + self.q_len

    def mask(self, window: int | None):
        """The mask for layers with sliding ``window`` (None: full causal), built once and reused."""
        if window not in self._masks:
            self._masks[window] = (
                self._block_mask(window) if self.backend == "flex" else self._bool_mask(window)
            )
        return self._masks[window]

    def _bool_mask(self, window: int | None) -> torch.Tensor | None:
        if self.lengths is not None:  # [B, 1, 1, kv_len]: per-row lengths of a static cache
            q = self.lengths[:, None]
            k = torch.arange(self.kv_len, device=self.device)[None, :]
            allowed = k <= q
            if window is not None:
                allowed = allowed & (q - k < window)
            return allowed[:, None, None, :]
        if self.doc_ids is None and window is None and (self.past == 0 or self.q_len == 1):
            return None  # plain causal (or a single decode step): no mask tensor
        q = torch.arange(self.past, self.kv_len, device=self.device)[:, None]
        k = torch.arange(self.kv_len, device=self.device)[None, :]
        allowed = k <= q
        if window is not None:
            allowed = allowed & (q - k < window)
        if self.doc_ids is not None:
            allowed = allowed & (self.doc_ids[:, None] == self.doc_ids[None, :])
        return allowed

    def _block_mask(self, window: int | None):
        docs = self.doc_ids

        def mask_mod(b, h, q_idx, kv_idx):
            allowed = kv_idx <= q_idx
            if window is not None:
                allowed = allowed & (q_idx - kv_idx < window)
            if docs is not None:
                allowed = allowed & (docs[q_idx] == docs[kv_idx])
            return allowed

        return create_block_mask(mask_mod, None, None, self.q_len, self.kv_len, device=self.device)


def check_backend(requested: str) -> None:
    if requested not in BACKENDS:
        raise KindredValueError(f"attn_backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "flex" and not HAVE_FLEX:
        raise KindredValueError("attn_backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
    if requested == "varlen" and not HAVE_VARLEN:
        raise KindredValueError("attn_backend='varlen' needs torch.nn.attention.varlen (torch >= 2.10)")


def varlen_supported(
    device: torch.device, dtype: torch.dtype, head_dim: int, sinks: bool, window: bool = False
) -> str | None:
    """Why layers of this kind (``window``: some have a sliding window) cannot attend through varlen flash
    attention, or None when they can."""
    if not HAVE_VARLEN:
        return "this torch has no torch.nn.attention.varlen"
    if window and "window_size" not in _VARLEN_ARGS:
        return "this torch's varlen attention has no sliding windows (torch >= 2.11 has)"
    if device.type != "cuda":
        return f"it runs on CUDA only, the model is on {device}"
    if dtype not in VARLEN_DTYPES:
        return f"it takes float16 or bfloat16 activations, the model computes in {dtype}"
    if head_dim > VARLEN_MAX_HEAD_DIM or head_dim % 8:
        return f"its head size must be a multiple of 8 up to {VARLEN_MAX_HEAD_DIM}, got {head_dim}"
    if sinks:
        return "attention sinks (gpt-oss) need the softmax's normalizer in the backward"
    return None


def varlen_reason(
    requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, sinks: bool, window: bool
) -> str | None:
    """``pick_backend``'s ``varlen`` for a model's forward: ``varlen_supported``'s reason, raised for an
    explicit attn_backend="varlen"; under "auto" heads of at most FLEX_MAX_HEAD_DIM keep FlexAttention."""
    why = varlen_supported(device, dtype, head_dim, sinks, window)
    if requested == "varlen" and why is not None:
        raise KindredValueError(f"attn_backend='varlen' cannot run this model: {why}")
    if why is None and requested == "auto" and head_dim <= FLEX_MAX_HEAD_DIM:
        return f"FlexAttention is the faster at head size {head_dim}"
    return why


def pick_backend(
    requested: str, device: torch.device, needs_mask: bool, cached: bool, varlen: str | None = "unsupported"
) -> str:
    """The backend of one forward. ``varlen``: why the caller's layers do not take varlen (``varlen_reason``;
    None: they do); where they do not, "varlen" is chosen as "auto" would choose without it."""
    check_backend(requested)
    if cached:
        return "sdpa"  # decoding: short queries against a growing cache
    if requested in ("auto", "varlen"):
        if device.type != "cuda" or not needs_mask:
            return "varlen" if requested == "varlen" and varlen is None else "sdpa"
        return "varlen" if varlen is None else "flex" if HAVE_FLEX else "sdpa"
    return requested


def varlen_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Causal attention within each document for q [T, H, D], k and v [T, Hkv, D] of packed documents
    (int32 offsets ``cu_seqlens``); a sliding window keeps key index > query index − window."""
    args: dict = {"scale": scale}
    if "window_size" in _VARLEN_ARGS:
        args["window_size"] = (-1 if window is None else window - 1, 0)
    else:  # varlen_supported refused windows
        args["is_causal"] = True
    if "enable_gqa" in _VARLEN_ARGS:
        args["enable_gqa"] = q.shape[1] != k.shape[1]
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **args)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: AttentionContext,
    window: int | None,
    scale: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v for q [B, H, Tq, D], k and v [B, Hkv, Tk, D] (grouped-query heads).

    ``sinks`` [H] (gpt-oss): one more logit per head in every softmax, with no value: the output is scaled
    by Z / (Z + e^sink), Z the softmax's normalizer, i.e. by σ(logsumexp − sink).
    """
    gqa = q.shape[1] != k.shape[1]
    packed_cpu = ctx.cu_seqlens is not None and not q.is_cuda and ctx.backend != "flex"
    if packed_cpu and ctx.past == 0 and sinks is None:
        return _attend_per_document(q, k, v, ctx.cu_seqlens.tolist(), window, scale, gqa)
    mask = ctx.mask(window)
    if sinks is not None:
        return _attend_with_sinks(q, k, v, ctx, mask, scale, sinks)
    if ctx.backend == "flex":
        if q.is_cuda:
            with warnings.catch_warnings():  # dynamo tracing a grad-requiring q reads .grad (harmless)
                warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not")
                return _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
        with warnings.catch_warnings():  # eager FlexAttention on the CPU: the unfused reference path
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    causal = mask is None and ctx.past == 0
    if gqa and q.shape[2] == 1 and not causal:
        # One query per row (decoding): the query heads sharing a kv head become rows against its keys, so
        # the cache is read once per kv head instead of being repeated for every query head.
        b, h, _, d = q.shape
        rows = q.reshape(b, k.shape[1], h // k.shape[1], d)  # q may be a transposed view
        return F.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale).reshape(b, h, 1, d)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )


def _attend_per_document(q, k, v, bounds: list[int], window: int | None, scale: float, gqa: bool):
    """Packed documents (one row, offsets ``bounds``) on the CPU: causal attention within each document's
    slice, Σ len² work where one masked [T, T] product would cost T² (a batch of prompts prefilled)."""
    outs = []
    for start, end in itertools.pairwise(bounds):
        n = end - start
        if n == 0:
            continue
        mask = None
        if window is not None and window < n:
            i = torch.arange(n)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        part = (x[:, :, start:end] for x in (q, k, v))
        outs.append(
            F.scaled_dot_product_attention(
                *part, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa
            )
        )
    return torch.cat(outs, dim=2)


def _attend_with_sinks(
    q, k, v, ctx: AttentionContext, mask, scale: float, sinks: torch.Tensor
) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    if ctx.backend == "flex":  # FlexAttention's logsumexp gives the sink's share without a [T, T] tensor
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not")
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            fn = _compiled_flex() if q.is_cuda else flex_attention
            out, aux = fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa, **_LSE)
        lse = aux if isinstance(aux, torch.Tensor) else aux.lse
        return out * torch.sigmoid(lse - sinks.float()[None, :, None]).unsqueeze(-1).to(out.dtype)
    # The explicit softmax with the sink as an extra column (the CPU reference; SDPA has no sinks).
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if mask is None and ctx.past == 0 and ctx.q_len > 1:  # plain causal
        qi = torch.arange(ctx.q_len, device=q.device)[:, None]
        mask = torch.arange(ctx.kv_len, device=q.device)[None, :] <= qi
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float()[None, :, None, None].expand(*scores.shape[:-1], 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    return probs.to(v.dtype) @ v
