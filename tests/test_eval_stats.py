"""kindred.eval.stats against scipy: Wilson intervals, the exact McNemar (sign) test, Bradley–Terry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kindred.errors import KindredValueError
from kindred.eval.stats import (
    bootstrap_bradley_terry,
    bradley_terry,
    mcnemar_exact,
    percentile,
    wilson_interval,
)

scipy_stats = pytest.importorskip("scipy.stats")
optimize = pytest.importorskip("scipy.optimize")


@pytest.mark.parametrize("k, n", [(0, 16), (1, 16), (7, 16), (15, 16), (16, 16), (3, 5), (50, 117)])
def test_wilson_matches_scipy(k, n):
    ref = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)


def test_wilson_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(2.5, 5)  # half wins (ties) are allowed
    assert lo < 0.5 < hi and hi - 0.5 == pytest.approx(0.5 - lo)
    with pytest.raises(KindredValueError):
        wilson_interval(6, 5)


@pytest.mark.parametrize("b, c", [(0, 0), (0, 1), (1, 0), (3, 3), (1, 7), (9, 2), (0, 12), (25, 40)])
def test_mcnemar_exact_is_the_two_sided_sign_test(b, c):
    ref = 1.0 if b + c == 0 else scipy_stats.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-12)


def test_percentile_is_numpys():
    values = [0.3, 1.2, 0.9, 4.0, 2.2]
    assert percentile(values, 95) == pytest.approx(float(np.percentile(values, 95)))
    assert percentile([], 50) is None


def _penalized_mle(names, outcomes):
    """Reference: maximise the same log-likelihood (with the one-tie-against-strength-1 prior) with scipy."""
    idx = {n: i for i, n in enumerate(names)}

    def nll(theta):
        total = 0.0
        for a, b, s in outcomes:
            x, y = theta[idx[a]], theta[idx[b]]
            total += s * x + (1 - s) * y - np.logaddexp(x, y)
        for x in theta:  # half a win and half a loss against a player of strength e^0
            total += 0.5 * x - np.logaddexp(x, 0.0)
        return -total

    sol = optimize.minimize(nll, np.zeros(len(names)), method="BFGS", options={"gtol": 1e-10})
    ratings = 400 * sol.x / math.log(10)
    return dict(zip(names, ratings - ratings.mean() + 1000, strict=True))


def test_bradley_terry_matches_the_likelihood_optimum():
    rng = np.random.default_rng(3)
    names = ["base", "tuned", "other", "fourth"]
    true = {"base": 0.0, "tuned": 1.2, "other": 0.4, "fourth": -0.5}
    outcomes = []
    for _ in range(300):
        a, b = rng.choice(names, 2, replace=False)
        p = 1 / (1 + math.exp(true[b] - true[a]))
        u = rng.random()
        outcomes.append((a, b, 0.5 if abs(u - p) < 0.05 else float(u < p)))
    got = bradley_terry(names, outcomes)
    ref = _penalized_mle(names, outcomes)
    for n in names:
        assert got[n] == pytest.approx(ref[n], abs=1e-3)  # rating points: 6e-6 nats
    assert max(got, key=got.get) == "tuned" and min(got, key=got.get) == "fourth"
    ci = bootstrap_bradley_terry(names, outcomes, rounds=60, seed=1)
    for n in names:
        assert ci[n][0] < got[n] < ci[n][1]


def test_bradley_terry_stays_finite_for_a_clean_sweep():
    got = bradley_terry(["a", "b"], [("a", "b", 1.0)] * 10)
    assert math.isfinite(got["a"]) and got["a"] > got["b"]
    with pytest.raises(KindredValueError, match="bad pair"):
        bradley_terry(["a", "b"], [("a", "c", 1.0)])
