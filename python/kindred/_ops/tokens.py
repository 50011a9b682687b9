"""torch and numpy attached to the tokens family of the core.

The two ops training runs on the device, ``kindred::count_trainable`` and ``kindred::position_ids``, are
``torch.library`` custom ops with fake implementations (``torch.compile`` traces through them; no host sync).
Data preparation (counts, budget, packing) runs on the CPU over numpy arrays: thin wrappers that build
TensorViews of numpy arrays, allocate the outputs and call ``kindred._core``.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _core
from ..errors import KindredValueError
from .adapter import np_view, stream, view

IGNORE_INDEX: int = _core.IGNORE_INDEX


def _i32(a, name: str) -> np.ndarray:
    """``a`` as a contiguous int32 array; a value int32 cannot hold is an error naming ``name`` and its index
    (narrowing would wrap it: a length of 2³² + 5 would pack as 5)."""
    if isinstance(a, np.ndarray) and a.dtype == np.int32:
        return np.ascontiguousarray(a)
    a = np.asarray(a)
    if a.dtype.kind not in "iub" and a.size:
        raise KindredValueError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.size and a.dtype.kind in "iu" and a.dtype.itemsize >= 4:
        info = np.iinfo(np.int32)
        wide = np.flatnonzero((a < info.min) | (a > info.max))
        if wide.size:
            i = int(wide[0])
            raise KindredValueError(f"{name}[{i}] = {int(a.reshape(-1)[i])} does not fit in int32")
    return np.ascontiguousarray(a, dtype=np.int32)


# --------------------------------------------------------------------------------------------------------
# Device ops (custom ops)


@torch.library.custom_op("kindred::count_trainable", mutates_args=())
def count_trainable(
    labels: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trainable tokens (labels != -100) per sequence [Q], per row [R], in all [1]; int32, labels' device."""
    rows = labels.shape[0] if labels.dim() == 2 else 1
    q = max(cu_seqlens.numel() - 1, 0)
    dev = labels.device
    seq = torch.empty(q, dtype=torch.int32, device=dev)
    row = torch.empty(rows, dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    _core.count_trainable(
        view(labels, "labels"),
        view(cu_seqlens, "cu_seqlens"),
        view(seq),
        view(row),
        view(total),
        stream(labels),
    )
    return seq, row, total


@count_trainable.register_fake
def _(labels, cu_seqlens):
    rows = labels.shape[0] if labels.dim() == 2 else 1
    q = max(cu_seqlens.numel() - 1, 0)
    return (
        labels.new_empty(q, dtype=torch.int32),
        labels.new_empty(rows, dtype=torch.int32),
        labels.new_empty(1, dtype=torch.int32),
    )


@torch.library.custom_op("kindred::position_ids", mutates_args=())
def position_ids(cu_seqlens: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Position ids [num_tokens] restarting at 0 at every cu_seqlens boundary (int32 or int64)."""
    out = torch.empty(num_tokens, dtype=dtype, device=cu_seqlens.device)
    _core.position_ids(view(cu_seqlens, "cu_seqlens"), view(out, "dtype"), stream(cu_seqlens))
    return out


@position_ids.register_fake
def _(cu_seqlens, num_tokens, dtype):
    return cu_seqlens.new_empty(num_tokens, dtype=dtype)


# --------------------------------------------------------------------------------------------------------
# CPU data preparation over numpy arrays


def count_tokens(
    ids: np.ndarray,
    seg_offsets: np.ndarray,
    seg_trainable: np.ndarray,
    seg_turn: np.ndarray,
    seg_exchange: np.ndarray,
    example_segs: np.ndarray,
    turn_offsets: np.ndarray,
    exchange_offsets: np.ndarray,
) -> dict[str, np.ndarray]:
    """Labels and per-example / per-turn / per-exchange counts of segmented examples (see tokens.h)."""
    n = len(example_segs) - 1
    turns = int(turn_offsets[-1]) if len(turn_offsets) else 0
    exchanges = int(exchange_offsets[-1]) if len(exchange_offsets) else 0
    out = {
        "labels": np.empty(len(ids), np.int32),
        "example_tokens": np.empty(n, np.int32),
        "example_trainable": np.empty(n, np.int32),
        "example_fixed": np.empty(n, np.int32),
        "turn_tokens": np.empty(turns, np.int32),
        "turn_trainable": np.empty(turns, np.int32),
        "exchange_tokens": np.empty(exchanges, np.int32),
        "exchange_trainable": np.empty(exchanges, np.int32),
    }
    _core.count_tokens(
        np_view(ids, "ids"),
        np_view(seg_offsets, "seg_offsets"),
        np_view(seg_trainable, "seg_trainable"),
        np_view(seg_turn, "seg_turn"),
        np_view(seg_exchange, "seg_exchange"),
        np_view(example_segs, "example_segs"),
        np_view(turn_offsets, "turn_offsets"),
        np_view(exchange_offsets, "exchange_offsets"),
        *(np_view(v) for v in out.values()),
    )
    return out


def apply_budget(
    example_tokens: np.ndarray,
    example_fixed: np.ndarray,
    exchange_tokens: np.ndarray,
    exchange_offsets: np.ndarray,
    budget: int,
    policy: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(action, drop_exchanges, tokens_after), each int32 [N]; actions are _core.BUDGET_*."""
    n = len(example_tokens)
    action, drop, after = (np.empty(n, np.int32) for _ in range(3))
    _core.apply_budget(
        np_view(_i32(example_tokens, "example_tokens"), "example_tokens"),
        np_view(_i32(example_fixed, "example_fixed"), "example_fixed"),
        np_view(_i32(exchange_tokens, "exchange_tokens"), "exchange_tokens"),
        np_view(np.ascontiguousarray(exchange_offsets, dtype=np.int64), "exchange_offsets"),
        int(budget),
        policy,
        np_view(action),
        np_view(drop),
        np_view(after),
    )
    return action, drop, after


def pack_bfd(lengths, max_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Best-fit-decreasing placement: (row int32 [N], start int32 [N], number of rows)."""
    lengths = _i32(lengths, "lengths").reshape(-1)
    row = np.empty(len(lengths), np.int32)
    start = np.empty(len(lengths), np.int32)
    rows = _core.pack_bfd(np_view(lengths, "lengths"), int(max_tokens), np_view(row), np_view(start))
    return row, start, int(rows)


def pack_rows(
    ids: np.ndarray,
    labels: np.ndarray,
    example_offsets: np.ndarray,
    row: np.ndarray,
    start: np.ndarray,
    rows: int,
    max_tokens: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Packed rows [rows, max_tokens] and their sequences from examples placed by :func:`pack_bfd`."""
    lengths = np.diff(example_offsets)
    fill = (
        np.bincount(row, weights=lengths, minlength=rows).astype(np.int64)
        if len(row)
        else np.zeros(rows, np.int64)
    )
    q = len(row) + int(np.count_nonzero(fill < max_tokens))
    out = {
        "input_ids": np.empty((rows, max_tokens), np.int32),
        "labels": np.empty((rows, max_tokens), np.int32),
        "position_ids": np.empty((rows, max_tokens), np.int32),
        "cu_seqlens": np.empty(q + 1, np.int32),
        "seq_example": np.empty(q, np.int32),
        "row_seqs": np.empty(rows + 1, np.int64),
        "row_trainable": np.empty(rows, np.int32),
    }
    _core.pack_rows(
        np_view(ids, "ids"),
        np_view(labels, "labels"),
        np_view(example_offsets, "example_offsets"),
        np_view(row, "row"),
        np_view(start, "start"),
        int(pad_id),
        *(np_view(v) for v in out.values()),
    )
    return out
