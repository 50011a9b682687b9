"""The container of tokenized chat data: ``TokenizedData`` (examples back to back, CSR, with labels and
counts) and the operations on it that need no tokenizer (take, concat, compose, cutting exchanges out,
assembling labels and counts of segmented token streams in the C++ core). The engines that produce it from
rendered conversations are in ``accounting``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from .._ops import tokens as _tokens

ROLE_CODES = {"template": 0, "system": 1, "user": 2, "assistant": 3}
ROLE_NAMES = tuple(ROLE_CODES)


@dataclass
class TokenizedData:
    """Tokenized examples, back to back (CSR), with labels and counts.

    Per example (N), per turn (message; ``turn_offsets``), per exchange (``exchange_offsets``) and per
    segment (``example_segs``). ``fixed`` counts the tokens outside every exchange (template prefix/suffix,
    system prompt): the part truncation keeps.
    """

    ids: np.ndarray  # int32 [T]
    labels: np.ndarray  # int32 [T]
    offsets: np.ndarray  # int64 [N + 1]
    tokens: np.ndarray  # int32 [N]
    trainable: np.ndarray  # int32 [N]
    fixed: np.ndarray  # int32 [N]
    turn_offsets: np.ndarray  # int64 [N + 1]
    turn_tokens: np.ndarray  # int32 [turns]
    turn_trainable: np.ndarray  # int32 [turns]
    turn_role: np.ndarray  # uint8 [turns], ROLE_CODES
    exchange_offsets: np.ndarray  # int64 [N + 1]
    exchange_tokens: np.ndarray  # int32 [exchanges]
    exchange_trainable: np.ndarray  # int32 [exchanges]
    seg_offsets: np.ndarray  # int64 [S + 1], token offsets
    seg_trainable: np.ndarray  # uint8 [S]
    seg_turn: np.ndarray  # int32 [S]
    seg_exchange: np.ndarray  # int32 [S]
    seg_role: np.ndarray  # uint8 [S]
    example_segs: np.ndarray  # int64 [N + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, labels) of example ``i``."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.labels[a:b]

    def segments(self, i: int) -> list[tuple[str, bool, np.ndarray]]:
        """(role, trainable, ids) of each segment of example ``i``."""
        out = []
        for g in range(self.example_segs[i], self.example_segs[i + 1]):
            a, b = self.seg_offsets[g], self.seg_offsets[g + 1]
            out.append((ROLE_NAMES[self.seg_role[g]], bool(self.seg_trainable[g]), self.ids[a:b]))
        return out

    def exchanges(self, i: int) -> np.ndarray:
        return self.exchange_tokens[self.exchange_offsets[i] : self.exchange_offsets[i + 1]]

    def take(self, index) -> TokenizedData:
        """The examples at ``index`` (in that order)."""
        index = np.asarray(index, dtype=np.int64)
        tok = gather_csr(self.offsets, index)
        seg = gather_csr(self.example_segs, index)
        turn = gather_csr(self.turn_offsets, index)
        exch = gather_csr(self.exchange_offsets, index)
        seg_len = np.diff(self.seg_offsets)[seg[0]]
        seg_offsets = np.zeros(len(seg_len) + 1, np.int64)
        np.cumsum(seg_len, out=seg_offsets[1:])
        return TokenizedData(
            ids=self.ids[tok[0]],
            labels=self.labels[tok[0]],
            offsets=tok[1],
            tokens=self.tokens[index],
            trainable=self.trainable[index],
            fixed=self.fixed[index],
            turn_offsets=turn[1],
            turn_tokens=self.turn_tokens[turn[0]],
            turn_trainable=self.turn_trainable[turn[0]],
            turn_role=self.turn_role[turn[0]],
            exchange_offsets=exch[1],
            exchange_tokens=self.exchange_tokens[exch[0]],
            exchange_trainable=self.exchange_trainable[exch[0]],
            seg_offsets=seg_offsets,
            seg_trainable=self.seg_trainable[seg[0]],
            seg_turn=self.seg_turn[seg[0]],
            seg_exchange=self.seg_exchange[seg[0]],
            seg_role=self.seg_role[seg[0]],
            example_segs=seg[1],
        )

    @staticmethod
    def concat(parts: Sequence[TokenizedData]) -> TokenizedData:
        """Examples of all ``parts``, in order."""
        if len(parts) == 1:
            return parts[0]
        out = {}
        for f in fields(TokenizedData):
            arrays = [getattr(p, f.name) for p in parts]
            if f.name in ("offsets", "turn_offsets", "exchange_offsets", "seg_offsets", "example_segs"):
                pieces, base = [arrays[0][:1] * 0], 0
                for a in arrays:
                    pieces.append(a[1:] + base)
                    base += int(a[-1])
                out[f.name] = np.concatenate(pieces)
            else:
                out[f.name] = np.concatenate(arrays)
        return TokenizedData(**out)


_FAMILIES = (  # CSR families of TokenizedData: offsets field, per-element fields
    ("offsets", ("ids", "labels")),
    ("example_segs", ("seg_trainable", "seg_turn", "seg_exchange", "seg_role")),
    ("turn_offsets", ("turn_tokens", "turn_trainable", "turn_role")),
    ("exchange_offsets", ("exchange_tokens", "exchange_trainable")),
)
_PER_EXAMPLE = ("tokens", "trainable", "fixed")


def compose(
    base: TokenizedData, rows: np.ndarray, other: TokenizedData | None, other_row: np.ndarray
) -> TokenizedData:
    """Example ``rows[j]`` of ``base`` for each j, or ``other_row[j]`` of ``other`` where that is >= 0.

    Built from contiguous slices (one copy of the data), so replacing or dropping a few examples of a large
    data set costs one pass over it.
    """
    rows = np.asarray(rows, np.int64)
    other_row = np.asarray(other_row, np.int64)
    # Pieces: maximal runs of consecutive base rows, and single rows of `other`.
    n = len(rows)
    from_other = other_row >= 0
    brk = np.ones(n, bool)
    if n > 1:
        brk[1:] = from_other[1:] | from_other[:-1] | (np.diff(rows) != 1)
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], n) if n else starts  # no example left: no piece
    pieces: list[tuple[int, int, int]] = [  # (source 0 = base / 1 = other, first row, end row)
        (1, int(other_row[a]), int(other_row[a]) + 1)
        if from_other[a]
        else (0, int(rows[a]), int(rows[b - 1]) + 1)
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True)
    ]
    sources = (base, other)
    out = {}
    for name in _PER_EXAMPLE:
        out[name] = np.concatenate(
            [getattr(sources[s], name)[a:b] for s, a, b in pieces] or [base.tokens[:0]]
        )
    for offsets_name, element_names in _FAMILIES:
        spans = [
            (s, getattr(sources[s], offsets_name)[a], getattr(sources[s], offsets_name)[b])
            for s, a, b in pieces
        ]
        lengths = np.concatenate(
            [np.diff(getattr(sources[s], offsets_name)[a : b + 1]) for s, a, b in pieces]
            or [np.zeros(0, np.int64)]
        )
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        out[offsets_name] = offsets
        for name in element_names:
            out[name] = np.concatenate(
                [getattr(sources[s], name)[lo:hi] for s, lo, hi in spans] or [getattr(base, name)[:0]]
            )
        if offsets_name == "example_segs":
            seg_len = np.concatenate(
                [np.diff(sources[s].seg_offsets[lo : hi + 1]) for s, lo, hi in spans]
                or [np.zeros(0, np.int64)]
            )
            seg_offsets = np.zeros(len(seg_len) + 1, np.int64)
            np.cumsum(seg_len, out=seg_offsets[1:])
            out["seg_offsets"] = seg_offsets
    return TokenizedData(**out)


def splice_exchanges(data: TokenizedData, rows: np.ndarray, drop: np.ndarray) -> TokenizedData:
    """Examples ``rows`` of ``data`` without their first ``drop`` exchanges, cut out in token space.

    Exact for templates whose exchanges are rendered independently and bounded by special tokens
    (``ChatTemplate.truncation_splices``): the result equals rendering and tokenizing the shortened
    conversations (tested). Turn indices shift down by two per dropped exchange (user + assistant).
    """
    sub = data.take(rows)
    drop = np.asarray(drop, np.int64)
    seg_example = np.repeat(np.arange(len(sub), dtype=np.int64), np.diff(sub.example_segs))
    k = drop[seg_example]
    keep = (sub.seg_exchange < 0) | (sub.seg_exchange >= k)
    seg_len = np.diff(sub.seg_offsets)
    shifted = sub.seg_exchange >= 0
    seg_turn = np.where(shifted, sub.seg_turn - 2 * k, sub.seg_turn).astype(np.int32)
    seg_exchange = np.where(shifted, sub.seg_exchange - k, -1).astype(np.int32)
    starts = sub.seg_offsets[:-1][keep]
    lengths = seg_len[keep]
    new_seg_offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=new_seg_offsets[1:])
    gather = np.repeat(starts - new_seg_offsets[:-1], lengths) + np.arange(
        new_seg_offsets[-1], dtype=np.int64
    )
    kept_per_example = np.bincount(seg_example[keep], minlength=len(sub))
    example_segs = np.zeros(len(sub) + 1, np.int64)
    np.cumsum(kept_per_example, out=example_segs[1:])
    return assemble(
        np.ascontiguousarray(sub.ids[gather]),
        new_seg_offsets,
        sub.seg_trainable[keep],
        seg_turn[keep],
        seg_exchange[keep],
        sub.seg_role[keep],
        example_segs,
        np.diff(sub.turn_offsets) - 2 * drop,
        np.diff(sub.exchange_offsets) - drop,
    )


def gather_csr(offsets: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(element indices, new offsets) selecting rows ``index`` of a CSR layout."""
    starts = offsets[index]
    lengths = offsets[index + 1] - starts
    new = np.zeros(len(index) + 1, np.int64)
    np.cumsum(lengths, out=new[1:])
    elements = np.repeat(starts - new[:-1], lengths) + np.arange(new[-1], dtype=np.int64)
    return elements, new


def assemble(
    ids,
    seg_offsets,
    seg_trainable,
    seg_turn,
    seg_exchange,
    seg_role,
    example_segs,
    turn_counts,
    exchange_counts,
) -> TokenizedData:
    """Labels and counts (C++ core) of segmented token streams."""
    n = len(example_segs) - 1
    turn_offsets = np.zeros(n + 1, np.int64)
    np.cumsum(turn_counts, out=turn_offsets[1:])
    exchange_offsets = np.zeros(n + 1, np.int64)
    np.cumsum(exchange_counts, out=exchange_offsets[1:])
    arrays = dict(
        seg_offsets=seg_offsets,
        seg_trainable=np.ascontiguousarray(seg_trainable, np.uint8),
        seg_turn=np.ascontiguousarray(seg_turn, np.int32),
        seg_exchange=np.ascontiguousarray(seg_exchange, np.int32),
        example_segs=example_segs,
        turn_offsets=turn_offsets,
        exchange_offsets=exchange_offsets,
    )
    counts = _tokens.count_tokens(ids, **arrays)
    seg_role = np.ascontiguousarray(seg_role, np.uint8)
    turn_role = np.zeros(int(turn_offsets[-1]), np.uint8)
    seg_turn_a = arrays["seg_turn"]
    has_turn = seg_turn_a >= 0
    seg_example = np.repeat(np.arange(n, dtype=np.int64), np.diff(example_segs))
    turn_role[turn_offsets[:-1][seg_example[has_turn]] + seg_turn_a[has_turn]] = seg_role[has_turn]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts["example_tokens"], out=offsets[1:])
    return TokenizedData(
        ids=ids,
        labels=counts["labels"],
        offsets=offsets,
        tokens=counts["example_tokens"],
        trainable=counts["example_trainable"],
        fixed=counts["example_fixed"],
        turn_tokens=counts["turn_tokens"],
        turn_trainable=counts["turn_trainable"],
        turn_role=turn_role,
        exchange_tokens=counts["exchange_tokens"],
        exchange_trainable=counts["exchange_trainable"],
        seg_role=seg_role,
        **arrays,
    )
