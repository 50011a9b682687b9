"""Offloaded activation checkpoints (``checkpoint_policy = "offload"``): full recomputation whose saved layer
inputs wait for the backward in host memory instead of on the GPU.

Each layer runs under ``torch.utils.checkpoint`` (non-reentrant, as "full" does: the layer keeps no graph,
its RNG state is replayed in the recompute, LoRA and any other trainable parameter get their gradients from
the usual engine, under DDP and FSDP2 alike). The one tensor such a checkpoint saves, the layer's input h,
goes through saved-tensor hooks that copy it to pinned host memory on a side CUDA stream (after h is
produced: the side stream waits on the compute stream; h's memory is not reused before the copy ends:
``record_stream``). In the backward, when layer i's recompute unpacks its input, the host→device copy of
layer i−1's input starts on the side stream, so it overlaps layer i's recompute and backward; the compute
stream waits on that copy's event before layer i−1 reads it. On the CPU the host copy is a plain tensor
copy (no streams, no pinning): the same code path.

Pinned buffers come from torch's caching host allocator (reused across steps; a copy records its stream
there, so a freed buffer is not handed out again before its copies finish). A layer's host copy lives as
long as its checkpoint's saved state: it is freed when that layer's backward has run (or the graph is
dropped). ``HostBytes`` counts the bytes held now and the peak (what the benchmark reports).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.checkpoint import checkpoint


class HostBytes:
    """Bytes of offloaded layer inputs in host memory: ``current`` and ``peak`` (since ``reset_peak``)."""

    def __init__(self):
        self.current = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __repr__(self) -> str:
        return f"HostBytes(current={self.current}, peak={self.peak})"


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per device, shared by every model and step."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class _HostCopy:
    """One layer input in host memory, with the device copy prefetched for its recompute (CUDA)."""

    __slots__ = ("__weakref__", "counter", "device", "earlier", "host", "nbytes", "ready")

    def __init__(self, x: torch.Tensor, counter: HostBytes, earlier: _HostCopy | None):
        self.device, self.counter, self.nbytes = x.device, counter, 0
        self.earlier = weakref.ref(earlier) if earlier is not None else None  # the layer before's input
        self.ready: tuple[torch.Tensor, torch.cuda.Event] | None = None
        if x.is_cuda:
            stream = _side_stream(x.device)
            self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(x.device))  # x is produced on the compute stream
            with torch.cuda.stream(stream):
                self.host.copy_(x.detach(), non_blocking=True)
            x.record_stream(stream)  # x's memory is not reused before the copy ends
        else:
            self.host = x.detach().clone()
        self.nbytes = self.host.numel() * self.host.element_size()
        counter.add(self.nbytes)

    def __del__(self):
        self.counter.current -= self.nbytes

    def prefetch(self) -> None:
        """Start the host→device copy on the side stream (into memory of the compute stream)."""
        if self.ready is not None or self.device.type != "cuda":
            return
        main = torch.cuda.current_stream(self.device)
        out = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        stream = _side_stream(self.device)
        stream.wait_stream(main)  # out's block may have been in use on the compute stream until now
        with torch.cuda.stream(stream):
            out.copy_(self.host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        out.record_stream(stream)  # freed unread (a backward that failed), it is still not reused too early
        self.ready = (out, done)

    def restore(self) -> torch.Tensor:
        """The input back on its device for the recompute; prefetches the layer before's input."""
        if self.device.type != "cuda":
            x = self.host
        else:
            self.prefetch()  # a no-op when the layer after already started it
            x, done = self.ready
            self.ready = None  # the recompute holds it while it needs it
            torch.cuda.current_stream(self.device).wait_event(done)
        earlier = self.earlier() if self.earlier is not None else None
        if earlier is not None:
            earlier.prefetch()
        return x


class Offloader:
    """One forward's layers checkpointed with their inputs in host memory, counted in ``counter``."""

    def __init__(self, counter: HostBytes):
        self.counter = counter
        # Autograd may keep the hooks, and what they reach, with the saved state until the backward: this
        # holds h only while its layer runs, and the previous layer's host copy weakly.
        self._input: torch.Tensor | None = None  # the input of the layer being checkpointed
        self._last: weakref.ref[_HostCopy] | None = None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, x: torch.Tensor):
        if x is not self._input:  # only h: the rotary tables are shared by every layer
            return x
        copy = _HostCopy(x, self.counter, self._last() if self._last is not None else None)
        self._last = weakref.ref(copy)
        return copy

    def checkpoint(self, layer, h: torch.Tensor, *args) -> torch.Tensor:
        """``layer(h, *args)`` checkpointed as ``torch.utils.checkpoint`` does, h saved in host memory."""
        self._input = h
        try:
            with self._hooks:
                return checkpoint(layer, h, *args, use_reentrant=False)
        finally:
            self._input = None


def _unpack(saved):
    return saved.restore() if isinstance(saved, _HostCopy) else saved
