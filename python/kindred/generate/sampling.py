"""Choosing the next token from logits [B, V]: repetition penalty, temperature, top-k, top-p, min-p, and a
seeded draw that depends only on (seed, prompt index, step), so that a row samples the same tokens alone or
in any batch, on any device.

The draw is the Gumbel-max trick: argmax(logits / T + g) with g = −log(−log u) is a sample of
softmax(logits / T); u comes from a 32-bit integer hash of (row key, vocabulary index), computed with
torch integer ops in 16-bit halves so that no product overflows int64.
"""

from __future__ import annotations

import torch

from .config import SamplingConfig

_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x · c) mod 2³² for x an int64 tensor or int in [0, 2³²) and a 32-bit constant c, without overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + ((hi * (c & 0xFFFF)) << 16)) & _M32


def hash32(x):
    """A 32-bit integer mix (Chris Wellons' lowbias32) of x in [0, 2³²); tensors (int64) or ints."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seed: int, rows: list[int], step: int) -> list[int]:
    """The 32-bit key of each row's draw at ``step`` (rows: indices into the caller's prompt list)."""
    base = hash32(seed & _M32)
    return [hash32(hash32(base ^ (r & _M32)) ^ (step & _M32)) for r in rows]


def gumbel(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise [B, V] float32 for row keys [B] (int64 on the logits' device)."""
    v = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    h = hash32(hash32(keys[:, None] ^ v[None, :]))
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: the logits of seen tokens (bool [B, V]) / penalty where positive,
    × penalty where negative."""
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits / temperature with the tokens outside top-k, top-p and min-p set to −inf (float32 [B, V])."""
    x = logits / cfg.temperature
    neg = float("-inf")
    if 0 < cfg.top_k < x.shape[-1]:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, neg)
    if cfg.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True, dim=-1)
        p = sorted_x.softmax(-1)
        drop = p.cumsum(-1) - p >= cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, neg))
    if cfg.min_p > 0.0:
        p = x.softmax(-1)
        x = x.masked_fill(p < cfg.min_p * p.max(-1, keepdim=True).values, neg)
    return x


def choose(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None, keys) -> torch.Tensor:
    """The next token [B] (int64) of each row from float32 logits [B, V].

    seen: bool [B, V] of the tokens so far (for the repetition penalty; None when it is 1). keys: the rows'
    draw keys (``row_keys``), unused when greedy."""
    if seen is not None:
        logits = penalize(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(-1)
    k = torch.tensor(keys, dtype=torch.int64).to(logits.device, non_blocking=True)
    return (filter_logits(logits, cfg) + gumbel(k, logits.shape[-1])).argmax(-1)
