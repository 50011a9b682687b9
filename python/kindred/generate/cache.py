"""The static KV cache of the engine and its length buckets.

Keys and values of every layer live in fixed tensors [rows, Hkv, capacity, D], row b holding prompt b's
tokens at slots 0, 1, ... (slot = position). A forward runs in one of two modes, set before it:
``prefill`` (a packed row of several prompts: each token's k/v goes to its (row, slot), attention runs over
the packed tensors) or ``decode`` (one token per row at slot lengths[b]; attention reads slots
0..bucket − 1 of each row, masked per row). Decode touches only fixed addresses, so it can be captured in
a CUDA graph per (batch, bucket).
"""

from __future__ import annotations

import torch

MIN_BUCKET = 128


def length_bucket(n: int) -> int:
    """The attended cache length for n filled slots: n rounded up to a multiple of 128 up to 1024, then to
    a multiple of 1/8 of its power of two (8 buckets per octave: at most 1/8 of the reads wasted)."""
    step = max(MIN_BUCKET, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def batch_bucket(n: int) -> int:
    """The captured batch size for n live rows: the next power of two."""
    return 1 << (n - 1).bit_length()


class StaticCache:
    """Keys and values of every layer, [rows, Hkv, capacity, D] each; see the module docstring."""

    def __init__(self, config, rows: int, capacity: int, dtype: torch.dtype, device: torch.device):
        shape = (rows, config.num_kv_heads, capacity, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.rows, self.capacity, self.dtype, self.device = rows, capacity, dtype, device
        self._prefill: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self._decode: tuple[int, int, torch.Tensor] | None = None

    def fits(self, rows: int, capacity: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (
            self.rows >= rows and self.capacity >= capacity and self.dtype == dtype and self.device == device
        )

    def prefill(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """The next forward is a packed row whose first len(rows) tokens go to (rows[i], slots[i])."""
        self._prefill, self._decode = (rows, slots, rows.numel()), None

    def decode(self, batch: int, length: int, lengths: torch.Tensor) -> None:
        """The next forward is one token for each of the first ``batch`` rows, written at slot lengths[b];
        attention reads slots [0, length)."""
        idx = lengths[:batch].view(batch, 1, 1, 1)
        self._decode, self._prefill = (batch, length, idx), None

    def decode_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode mode, for a kernel that writes the new keys and values itself (``rope_qk_cache``):
        ``layer``'s whole k and v [rows, Hkv, capacity, D] and each batch row's slot [batch]; ``attended``
        then gives what attention reads."""
        batch, _, idx = self._decode
        return self.k[layer], self.v[layer], idx.view(batch)

    def attended(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode mode: the slots [0, length) of the batch's rows of ``layer``'s k and v."""
        batch, length, _ = self._decode
        return self.k[layer][:batch, :, :length], self.v[layer][:batch, :, :length]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new k, v [B, Hkv, T, D] of ``layer``; return what its attention reads."""
        if self._prefill is not None:
            rows, slots, n = self._prefill
            self.k[layer][rows, :, slots] = k[0, :, :n].transpose(0, 1)
            self.v[layer][rows, :, slots] = v[0, :, :n].transpose(0, 1)
            return k, v
        batch, _, idx = self._decode
        kc, vc = self.attended(layer)
        idx = idx.expand(batch, k.shape[1], 1, k.shape[3])
        kc.scatter_(2, idx, k)
        vc.scatter_(2, idx, v)
        return kc, vc

    def keep(self, rows: list[int], length: int) -> None:
        """Move rows[i] to row i (i = 0, 1, ...), slots [0, length) only."""
        idx = torch.tensor(rows, device=self.device)
        for t in (*self.k, *self.v):
            t[: len(rows), :, :length] = t[idx, :, :length]
