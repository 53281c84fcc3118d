"""Scale-free agreement between two samples (R² of a line, Spearman's rank correlation) and the intervals
the study puts on its rates and correlations (Wilson for Hit@delta, a text-level bootstrap).

One home for both, used by the cost model's evaluation (`metabolic.evaluate.cost_fit`), the cost
warm-up's choice of eq. 14's mix (`metabolic.train.loop.choose_a_mix`) and the CSC approximations'
fidelity (`metabolic.csc.approx`). Both return NaN where they are undefined (fewer than 3 points, or
a constant sample), so callers can skip or report such a case instead of failing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def r_squared(x: Any, y: Any) -> float:
    """R² of the least-squares line y ~ a + b x (the squared Pearson correlation); NaN if undefined.

    >>> round(r_squared([1, 2, 3, 4], [2.0, 4.0, 6.0, 9.0]), 4)
    0.9888
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1] ** 2)


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN if undefined.

    >>> round(spearman([1, 2, 3, 4], [10, 20, 15, 40]), 6)
    0.8
    >>> spearman([1, 2, 3], [5, 5, 5])
    nan
    """
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(spearmanr(x, y).statistic)


# z of a two-sided 95% interval
Z95 = 1.959963984540054


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (fractions in [0, 1]) of a binomial rate with `hits` of `n`; (NaN, NaN) for n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n hits: 16 of 16
    has a 95% lower bound of 0.81.

    >>> [round(v, 3) for v in wilson_interval(16, 16)]
    [0.806, 1.0]
    """
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= hits <= n:
        raise ValueError(f"hits={hits} is outside 0..n={n}: count the hits among the n trials")
    p = hits / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # exact at the ends: rounding must not lift the bound off 0 hits or below n hits
    return (0.0 if hits == 0 else max(0.0, centre - half)), (1.0 if hits == n else min(1.0, centre + half))


def bootstrap_interval(statistic, groups: list, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(resampled groups)`, resampling whole groups (texts).

    `groups` is a list of per-text items; `statistic` maps a list of them to a number. Texts, not
    tokens, are resampled: tokens of one text are not independent. Resamples where the statistic is
    undefined (NaN) are dropped; (NaN, NaN) when fewer than half remain or there are < 3 groups.

    >>> lo, hi = bootstrap_interval(lambda g: float(np.mean(g)), [1.0, 2.0, 3.0, 4.0, 5.0], n_boot=200)
    >>> 1.0 <= lo < 3.0 < hi <= 5.0
    True
    """
    if len(groups) < 3:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(groups), size=len(groups))
        value = statistic([groups[i] for i in pick])
        if math.isfinite(value):
            values.append(value)
    if len(values) < n_boot / 2:
        return math.nan, math.nan
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))
