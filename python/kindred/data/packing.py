"""Best-fit-decreasing packing of tokenized examples into rows of ``max_tokens`` (C++ core).

Each packed row holds whole examples back to back from position 0, the tail padded. Every example is one
sequence of ``cu_seqlens`` and each row's padding one more, so ``cu_seqlens`` tiles the flattened rows and
varlen (FlashAttention-style) attention never lets a sequence see another; position ids restart at 0 per
sequence; the first label of every sequence is -100 so no target crosses a sequence start. ``row_trainable``
counts the trained labels of each row (for loss normalization; on the device, ``kindred.ops.count_trainable``
recomputes them from a batch without a host sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._ops import tokens as _tokens
from ..errors import KindredValueError
from .tokenized import TokenizedData


@dataclass
class PackedData:
    """Packed rows and their sequences (numpy, CPU)."""

    input_ids: np.ndarray  # int32 [R, L]
    labels: np.ndarray  # int32 [R, L]
    position_ids: np.ndarray  # int32 [R, L]
    cu_seqlens: np.ndarray  # int32 [Q + 1] over the flattened R × L tokens
    seq_example: np.ndarray  # int32 [Q]: example of each sequence, -1 for padding
    row_seqs: np.ndarray  # int64 [R + 1]: each row's slice of the sequences
    row_trainable: np.ndarray  # int32 [R]
    example_row: np.ndarray  # int32 [N]
    example_start: np.ndarray  # int32 [N]
    max_tokens: int

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def real_tokens(self) -> int:
        return int(np.diff(self.cu_seqlens)[self.seq_example >= 0].sum())

    @property
    def padding_tokens(self) -> int:
        return self.rows * self.max_tokens - self.real_tokens

    @property
    def fill(self) -> float:
        """Share of the rows' tokens that are real (1 - padding waste)."""
        return self.real_tokens / max(self.rows * self.max_tokens, 1)

    def batch(self, rows, device=None) -> dict:
        """A training batch of the given rows as torch tensors (labels int64, the rest int32).

        ``cu_seqlens`` is rebased to the batch; ``max_seqlen`` is a Python int (computed on the CPU, before
        anything moves to the device).
        """
        import torch

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise KindredValueError(f"rows must be in [0, {self.rows}), got {rows.tolist()}")
        lengths = [np.diff(self.cu_seqlens[self.row_seqs[r] : self.row_seqs[r + 1] + 1]) for r in rows]
        seq_len = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
        cu = np.zeros(len(seq_len) + 1, np.int32)
        np.cumsum(seq_len, out=cu[1:])

        def t(a, dtype=None):
            x = torch.from_numpy(np.ascontiguousarray(a))
            x = x.to(dtype) if dtype is not None else x
            return x.to(device) if device is not None else x

        return {
            "input_ids": t(self.input_ids[rows]),
            "labels": t(self.labels[rows], torch.int64),
            "position_ids": t(self.position_ids[rows]),
            "cu_seqlens": t(cu),
            "max_seqlen": int(seq_len.max()) if len(seq_len) else 0,
            "row_trainable": t(self.row_trainable[rows]),
        }


def pack(data: TokenizedData, max_tokens: int, pad_id: int = 0) -> PackedData:
    """Pack all examples of ``data`` (each at most ``max_tokens`` long: apply the budget first)."""
    if int(max_tokens) < 1:
        raise KindredValueError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
    max_tokens = int(max_tokens)
    lengths = np.diff(data.offsets).astype(np.int32)
    if len(lengths) and lengths.max() > max_tokens:
        i = int(np.argmax(lengths))
        raise KindredValueError(
            f"example {i} has {int(lengths[i]):,} tokens, more than the {max_tokens:,} of a packed row; "
            "apply a budget of at most max_tokens first"
        )
    row, start, rows = _tokens.pack_bfd(lengths, max_tokens)
    out = _tokens.pack_rows(data.ids, data.labels, data.offsets, row, start, rows, max_tokens, pad_id)
    return PackedData(example_row=row, example_start=start, max_tokens=max_tokens, **out)
