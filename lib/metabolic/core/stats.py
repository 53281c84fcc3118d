"""Scale-free agreement between two samples: R² of a line and Spearman's rank correlation.

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
