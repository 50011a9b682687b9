"""Functional API of the tokens family: the device ops training needs and best-fit-decreasing packing.

On the device (CUDA kernels; CPU reference otherwise), nothing synchronizes with the host:

    counts = kindred.ops.count_trainable(labels, cu_seqlens)   # per sequence, per row, total (int32)
    loss = loss_sum / counts.total                              # normalization stays on the device
    pos = kindred.ops.position_ids(cu_seqlens, labels.numel())

Data preparation (rendering, tokenizing, masks, budgets, packing whole data sets) lives in ``kindred.data``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .._ops import tokens as _tokens
from ..errors import KindredValueError

IGNORE_INDEX: int = _tokens.IGNORE_INDEX


class TrainableCounts(NamedTuple):
    """Tokens with a label (!= -100): per sequence [Q], per row [R] and in all [1]; int32, labels' device."""

    per_sequence: torch.Tensor
    per_row: torch.Tensor
    total: torch.Tensor


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise KindredValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def count_trainable(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> TrainableCounts:
    """Trainable-token counts of packed ``labels`` ([rows, row_length] or [tokens]; int32 or int64).

    ``cu_seqlens`` (int32 [Q + 1], on the same device) marks the sequences of the flattened labels; no
    sequence may cross a row boundary (checked on the CPU; not checked on the GPU, which never syncs).
    """
    _check_tensor(labels, "labels")
    _check_tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.device != labels.device:  # the core would read one of them through the wrong pointer
        raise KindredValueError(f"cu_seqlens is on {cu_seqlens.device} but labels are on {labels.device}")
    return TrainableCounts(*_tokens.count_trainable(labels, cu_seqlens))


def position_ids(cu_seqlens: torch.Tensor, num_tokens: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Position ids [num_tokens] that restart at 0 at every sequence start of ``cu_seqlens``.

    ``num_tokens`` must equal ``cu_seqlens[-1]``: it is passed so that nothing reads the device.
    """
    _check_tensor(cu_seqlens, "cu_seqlens")
    if dtype not in (torch.int32, torch.int64):
        raise KindredValueError(f"dtype must be torch.int32 or torch.int64, got {dtype}")
    if int(num_tokens) < 0:
        raise KindredValueError(f"num_tokens must be >= 0, got {num_tokens}")
    return _tokens.position_ids(cu_seqlens, int(num_tokens), dtype)


def pack_bfd(lengths, max_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Best-fit-decreasing placement of examples of ``lengths`` into rows of ``max_tokens``.

    Longest first (ties by index), each into the open row with the least room that still fits it, else a new
    row. Returns (row int32 [N], start int32 [N], number of rows): every example is placed exactly once, each
    row holds at most ``max_tokens`` tokens, and its examples tile it from 0. 1,000,000 examples take well
    under a second (counting sort plus a bitset search per example).
    """
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.detach().cpu().numpy()
    return _tokens.pack_bfd(np.asarray(lengths), max_tokens)
