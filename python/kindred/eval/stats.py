"""The statistics of an evaluation: Wilson intervals, the exact McNemar test, percentiles, Bradley–Terry."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import KindredValueError

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default); (0, 1) when n is 0.

    ``successes`` may be fractional (a tie counted as half a win)."""
    if n < 0 or successes < 0 or successes > n:
        raise KindredValueError(f"wilson_interval needs 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs: the binomial sign test of
    min(b, c) in b + c trials at 1/2 (1.0 when there are no discordant pairs)."""
    if b < 0 or c < 0:
        raise KindredValueError(f"mcnemar_exact needs counts >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear interpolation as numpy's default); None for no values."""
    if not len(values):
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def bradley_terry(
    names: Sequence[str], outcomes: Sequence[tuple[str, str, float]], iters: int = 10_000, tol: float = 1e-12
) -> dict[str, float]:
    """Bradley–Terry strengths by maximum likelihood (Hunter's MM algorithm), as Elo-like ratings:
    400 · log10(strength), centred so the ratings average 1000.

    ``outcomes``: (model i, model j, score of i) with score 1 (i won), 0 (j won) or 0.5 (tie, half a win
    each). A small prior (one tie of every model against a virtual player of strength 1) keeps the
    estimate finite when a model wins or loses every comparison and fixes the scale.
    """
    index = {n: k for k, n in enumerate(names)}
    m = len(names)
    if m < 2:
        raise KindredValueError(f"bradley_terry needs at least two models, got {list(names)}")
    wins = np.full(m, 0.5)  # the prior's half win
    games = np.zeros((m, m))
    for a, b, s in outcomes:
        if a not in index or b not in index or a == b:
            raise KindredValueError(f"bradley_terry: bad pair ({a!r}, {b!r}); models: {list(names)}")
        if s not in (0, 0.5, 1):
            raise KindredValueError(f"bradley_terry: score must be 0, 0.5 or 1, got {s!r}")
        i, j = index[a], index[b]
        wins[i] += s
        wins[j] += 1 - s
        games[i, j] += 1
        games[j, i] += 1
    p = np.ones(m)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1) + 1 / (p + 1)
        new = wins / denom
        if np.max(np.abs(np.log(new) - np.log(p))) < tol:
            p = new
            break
        p = new
    ratings = 400 * np.log10(p)
    ratings += 1000 - ratings.mean()
    return {n: float(ratings[index[n]]) for n in names}


def bootstrap_bradley_terry(
    names: Sequence[str], outcomes: Sequence[tuple[str, str, float]], rounds: int = 200, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95 % intervals of the Bradley–Terry ratings from ``rounds`` bootstrap resamples of the outcomes."""
    rng = np.random.default_rng(seed)
    outcomes = list(outcomes)
    samples = {n: [] for n in names}
    for _ in range(rounds):
        pick = rng.integers(0, len(outcomes), len(outcomes))
        ratings = bradley_terry(names, [outcomes[k] for k in pick])
        for n in names:
            samples[n].append(ratings[n])
    return {n: (percentile(v, 2.5), percentile(v, 97.5)) for n, v in samples.items()}
