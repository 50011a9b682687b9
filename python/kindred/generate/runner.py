"""The engine behind kindred.generate: packed prefill, a static KV cache, CUDA-graph decode steps.

Prefill packs a batch's prompts into one row with ``cu_seqlens`` (the model's packed attention:
FlexAttention on CUDA, a document mask on the CPU) and writes each prompt's keys and values to its cache
row; the logits are computed for the last token of each prompt only. Each decode step feeds one token per
live row. On CUDA the step is captured once per (batch bucket, length bucket) and replayed; the graphs stay
with the model's Engine across calls, keyed also by the LoRA state (which layers run their adapters), so a
steady run captures nothing new (``Engine.captures`` counts). Finished rows leave the batch: live rows move
to the front of the cache, and the step runs the next smaller batch bucket once it holds them all.
"""

from __future__ import annotations

import weakref

import torch

from ..models import DecoderLM
from ..models.attention import AttentionContext, document_ids, pick_backend
from ..nn import lora_modules
from .cache import StaticCache, batch_bucket, length_bucket

_PACK_MULTIPLE = 128  # CUDA prefill rows are padded to a power of two >= this (few FlexAttention compiles)


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Engine


def _pack_length(n: int, padded: bool) -> int:
    return max(_PACK_MULTIPLE, 1 << (n - 1).bit_length()) if padded else n


class Engine:
    """Per-model state that outlives a call: the static cache, captured graphs and their static inputs.

    ``Engine.for_model(model)`` returns the model's engine. ``padded`` (default: on CUDA) runs each step
    over the batch and length buckets of the graphs (else over the live rows and filled slots exactly);
    ``use_graphs`` (default: on CUDA) replays the captured steps, off for the eager step over the same
    shapes; ``fused`` (default: on CUDA, where the model allows) runs decode steps through the fused ops
    (``DecoderLayer.forward_decode``); ``captures`` counts graph captures; ``release()`` frees the cache
    and graphs.
    """

    def __init__(self, model: DecoderLM):
        self._model = weakref.ref(model)
        weight = model.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.padded = self.device.type == "cuda"
        self.use_graphs = self.padded
        self.captures = 0
        self.cache: StaticCache | None = None
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        # decode steps through the fused ops (CUDA by default; the CPU runs the core's references of them)
        self._fused = self.padded and model.model.can_fuse_decode
        self._tokens = self._lengths = None

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, on: bool) -> None:
        # A switch drops the graphs: the first fused step stacks the layers' decode buffers into one
        # (nn.stacked), freeing the ones an unfused graph captured before it would still read.
        if on != self._fused:
            self.graphs, self._pool = {}, None
        self._fused = on

    @classmethod
    def for_model(cls, model: DecoderLM) -> Engine:
        engine = _ENGINES.get(model)
        weight = model.model.embed_tokens.weight
        if engine is None or engine.device != weight.device or engine.dtype != weight.dtype:
            engine = _ENGINES[model] = cls(model)
        return engine

    @property
    def model(self) -> DecoderLM:
        return self._model()

    def signature(self) -> tuple:
        """What a captured step depends on besides shapes: the weights' storage, each LoRA layer's mode."""
        m = self.model
        loras = tuple(
            (id(x), x.disabled, x.active_adapter, x.merged_adapter, id(x.base_layer))
            for x in lora_modules(m).values()
        )
        return (m.model.embed_tokens.weight.data_ptr(), m.lm_head.weight.data_ptr(), loras)

    def reserve(self, rows: int, capacity: int) -> StaticCache:
        """A cache of at least ``rows`` × ``capacity`` (a new one drops the graphs that read the old)."""
        if self.padded:  # room for the padded batch and the last length bucket
            rows, cap = batch_bucket(rows), length_bucket(capacity)
        else:
            cap = capacity
        if self.cache is None or not self.cache.fits(rows, cap, self.dtype, self.device):
            old = self.cache
            rows = max(rows, old.rows if old else 0)
            cap = max(cap, old.capacity if old else 0)
            self.cache = self.graphs = self._pool = None  # the pool dies with its last graph
            self.cache = StaticCache(self.model.config, rows, cap, self.dtype, self.device)
            self.graphs = {}
            self._tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
            self._lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        return self.cache

    def release(self) -> None:
        """Free the cache and the graphs (the next call allocates and captures again)."""
        self.cache, self.graphs, self._pool = None, {}, None


class Runner:
    """One batch of prompts through the engine: ``prefill()``, then ``step(tokens)`` per new token, and
    ``keep(rows)`` when rows finish. Each returns float32 logits [live rows, vocab]."""

    def __init__(
        self, engine: Engine, prompts: list[list[int]], max_new_tokens: int, flags: list[bool] | None = None
    ):
        self.engine, self.model = engine, engine.model
        # flags: per row, the LoRA adapter on (True) or off; each forward sets the layers' row_adapter
        self.flags = flags
        self.loras = list(lora_modules(self.model).values()) if flags is not None else []
        self.seqs = [list(p) for p in prompts]
        self.lens = [len(p) for p in prompts]  # filled cache slots per live row (host copy: no syncs)
        self.cache = engine.reserve(len(prompts), max(self.lens) + max_new_tokens)
        self.signature = engine.signature() if engine.use_graphs else None
        rope = self.model.config.rope
        self.switch = rope.original_max_position_embeddings if rope.rope_type == "longrope" else None

    def prefill(self, rows: list[int] | None = None) -> torch.Tensor:
        """Encode self.seqs (or those of ``rows``) from slot 0; logits of each one's last token."""
        rows = list(range(len(self.seqs))) if rows is None else rows
        device, model = self.engine.device, self.model
        seqs = [self.seqs[r] for r in rows]
        n = sum(len(s) for s in seqs)
        total = _pack_length(n, self.engine.padded)
        flat = [t for s in seqs for t in s] + [0] * (total - n)
        bounds = [0]
        for s in seqs:
            bounds.append(bounds[-1] + len(s))
        if total > n:
            bounds.append(total)  # the padding is a document of its own
        ids = torch.tensor([flat], device=device)
        cu = torch.tensor(bounds, device=device)
        row_of = torch.tensor([r for r, s in zip(rows, seqs, strict=True) for _ in s], device=device)
        slots = torch.cat([torch.arange(len(s)) for s in seqs]).to(device)
        pos = torch.cat([slots, torch.zeros(total - n, dtype=torch.long, device=device)])[None]
        doc = document_ids(cu, total)
        backend = pick_backend(model.attn_backend, device, True, cached=False)
        self.cache.prefill(row_of, slots)
        if self.flags is not None:
            self._mask([self.flags[r] for r, s in zip(rows, seqs, strict=True) for _ in s], total)
        ctx = AttentionContext(total, 0, device, doc, backend, cu_seqlens=cu)
        hidden = model.model(ids, pos, ctx, self.cache)
        last = torch.tensor(bounds[1 : len(seqs) + 1], device=device) - 1
        for r, s in zip(rows, seqs, strict=True):
            self.lens[r] = len(s)
        return model.logits(hidden[0, last]).float()

    def _mask(self, flags: list[bool], rows: int) -> None:
        """Each LoRA layer's row_adapter for the next forward: ``flags``, then 0 up to ``rows``."""
        mask = torch.zeros(rows, dtype=self.engine.dtype)
        mask[: len(flags)] = torch.tensor(flags, dtype=self.engine.dtype)
        mask = mask.to(self.engine.device)
        for m in self.loras:
            m.row_adapter = mask

    def _decode(self, batch: int, length: int) -> torch.Tensor:
        e = self.engine
        tokens, lengths = e._tokens[:batch], e._lengths[:batch]
        self.cache.decode(batch, length, lengths)
        fused = e.fused and self.model.model.can_fuse_decode
        ctx = AttentionContext(1, length - 1, e.device, None, "sdpa", lengths=lengths, fused=fused)
        hidden = self.model.model(tokens[:, None], lengths[:, None], ctx, self.cache)
        return self.model.logits(hidden[:, 0]).float()

    def _graph(self, batch: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        e = self.engine
        key = (self.signature, batch, length)
        if key not in e.graphs:
            # Warm-up on a side stream (builds the decode weights, cuBLAS handles); it computes this very
            # step (same tokens, same slots), so the capture below only has to record it.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._decode(batch, length)
            torch.cuda.current_stream().wait_stream(side)
            if e._pool is None:
                e._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=e._pool):
                out = self._decode(batch, length)
            e.graphs[key] = (graph, out)
            e.captures += 1
        return e.graphs[key]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the token [live rows] each live row chose; logits of the next."""
        live = len(self.seqs)
        if self.switch is not None:
            for r, t in enumerate(tokens.tolist()):
                self.seqs[r].append(t)
        if self.switch is not None and self.switch in self.lens:
            # longrope: past the original context every position takes the long factors; re-encode the
            # row (one per batch: the engine runs longrope models past their switch one row at a time).
            return self.prefill()
        e = self.engine
        e._tokens[:live].copy_(tokens)
        e._lengths[:live].copy_(torch.tensor(self.lens, device=e.device), non_blocking=True)
        self.lens = [n + 1 for n in self.lens]
        if e.padded:  # the shapes of the graphs, replayed or not (the same kernels: the same results)
            batch, length = batch_bucket(live), length_bucket(max(self.lens))
            e._lengths[live:batch].zero_()  # padding rows write slot 0 of unused rows
        else:
            batch, length = live, max(self.lens)
        if self.flags is not None:  # a mixed batch: eager steps (the mask is not part of a graph)
            self._mask(self.flags, batch)
            out = self._decode(batch, length)
        elif e.use_graphs:
            graph, out = self._graph(batch, length)
            graph.replay()
        else:
            out = self._decode(batch, length)
        return out[:live]

    def keep(self, rows: list[int]) -> None:
        """Only ``rows`` (indices among the live rows) go on, in that order."""
        self.cache.keep(rows, max(self.lens))
        if self.flags is not None:
            self.flags = [self.flags[j] for j in rows]
        self.seqs = [self.seqs[j] for j in rows]
        self.lens = [self.lens[j] for j in rows]
