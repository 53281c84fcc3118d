"""Online affine calibration from total proxy cost to total CSC (paper IV.E, eq. 19-21).

The fitted map itself, `ProxyCalibration` (eq. 17), lives with the other budget rules in
`metabolic.core.budget`.

    C_CSC(x) ~ a + b * C_proxy(x)
    b = (S_xy - n x_bar y_bar) / ((S_xx - n x_bar^2) + gamma),   a = y_bar - b x_bar

`OnlineAffine` keeps the paper's sufficient statistics for K independent cost dimensions at once
(x and y of shape [n] or [n, K]). It stores them in centred form (count, means, centred sums of
squares and cross-products; Chan et al.'s parallel update) instead of the raw sums S_x, S_xx, ...:
the two are the same statistics (`sums()` returns the raw ones), but the centred form does not lose
digits to cancellation in S_xx - n x_bar^2, and two accumulators merge exactly. Everything is
float64 numpy, so the fit equals a closed-form ridge regression to ~1e-12.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from metabolic.core.errors import DataError


@dataclass(frozen=True)
class AffineFit:
    """Intercept `a` and slope `b`, float64 [K], and how many points they were fitted on."""

    a: np.ndarray
    b: np.ndarray
    n: int


class OnlineAffine:
    """Running ridge fit of y ~ a + b x for K dimensions; `update`, `merge`, `fit`, `state_dict`."""

    def __init__(self, k: int = 1, ridge: float = 1e-3) -> None:
        if k < 1:
            raise DataError(f"OnlineAffine k={k!r} is invalid: use k >= 1")
        if not (np.isfinite(ridge) and ridge >= 0):
            raise DataError(f"OnlineAffine ridge={ridge!r} is invalid: use a finite gamma >= 0")
        self.k = int(k)
        self.ridge = float(ridge)
        self.n = 0
        self.mean_x = np.zeros(self.k)
        self.mean_y = np.zeros(self.k)
        self.m2_x = np.zeros(self.k)  # sum of (x - x_bar)^2 = S_xx - n x_bar^2
        self.c_xy = np.zeros(self.k)  # sum of (x - x_bar)(y - y_bar) = S_xy - n x_bar y_bar

    def _as_points(self, values: Any, name: str) -> np.ndarray:
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2 or arr.shape[1] not in (1, self.k):
            raise DataError(f"OnlineAffine.update {name} has shape {np.shape(values)}: give [n] or [n, {self.k}]")
        if not np.all(np.isfinite(arr)):
            raise DataError(f"OnlineAffine.update {name} contains NaN or inf: drop unlabelled sequences first")
        return np.broadcast_to(arr, (arr.shape[0], self.k))

    def update(self, x: Any, y: Any) -> "OnlineAffine":
        """Add a batch of points: x (proxy totals) and y (CSC totals), each [n] or [n, K]."""
        xs, ys = self._as_points(x, "x"), self._as_points(y, "y")
        if xs.shape[0] != ys.shape[0]:
            raise DataError(f"OnlineAffine.update got {xs.shape[0]} x values and {ys.shape[0]} y values: give one y per x")
        if xs.shape[0] == 0:
            return self
        batch = OnlineAffine(self.k, self.ridge)
        batch.n = xs.shape[0]
        batch.mean_x, batch.mean_y = xs.mean(axis=0), ys.mean(axis=0)
        dx, dy = xs - batch.mean_x, ys - batch.mean_y
        batch.m2_x, batch.c_xy = (dx * dx).sum(axis=0), (dx * dy).sum(axis=0)
        return self.merge(batch)

    def merge(self, other: "OnlineAffine") -> "OnlineAffine":
        """Fold another accumulator's points into this one (in place); the result is order-independent."""
        if other.k != self.k:
            raise DataError(f"cannot merge OnlineAffine with k={other.k} into k={self.k}: both must have the same K")
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.mean_x, self.mean_y = other.n, other.mean_x.copy(), other.mean_y.copy()
            self.m2_x, self.c_xy = other.m2_x.copy(), other.c_xy.copy()
            return self
        n = self.n + other.n
        dx, dy = other.mean_x - self.mean_x, other.mean_y - self.mean_y
        factor = self.n * other.n / n
        self.m2_x = self.m2_x + other.m2_x + dx * dx * factor
        self.c_xy = self.c_xy + other.c_xy + dx * dy * factor
        self.mean_x = self.mean_x + dx * other.n / n
        self.mean_y = self.mean_y + dy * other.n / n
        self.n = n
        return self

    def fit(self) -> AffineFit:
        """Eq. (21): b = centred S_xy / (centred S_xx + gamma), a = y_bar - b x_bar; identity when empty."""
        if self.n == 0:
            return AffineFit(a=np.zeros(self.k), b=np.ones(self.k), n=0)
        denom = self.m2_x + self.ridge
        # gamma = 0 and all x equal: the slope is undefined; keep b = 0 (a = mean CSC), not a division by 0.
        b = np.divide(self.c_xy, denom, out=np.zeros(self.k), where=denom > 0)
        return AffineFit(a=self.mean_y - b * self.mean_x, b=b, n=self.n)

    def sums(self) -> dict[str, np.ndarray | int]:
        """The paper's raw running sums S_x, S_y, S_xx, S_xy and n (derived from the centred form)."""
        n = self.n
        return {
            "n": n,
            "S_x": n * self.mean_x,
            "S_y": n * self.mean_y,
            "S_xx": self.m2_x + n * self.mean_x**2,
            "S_xy": self.c_xy + n * self.mean_x * self.mean_y,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "k": self.k, "ridge": self.ridge, "n": self.n,
            "mean_x": self.mean_x.tolist(), "mean_y": self.mean_y.tolist(),
            "m2_x": self.m2_x.tolist(), "c_xy": self.c_xy.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "OnlineAffine":
        try:
            out = cls(int(state["k"]), float(state["ridge"]))
            out.n = int(state["n"])
            for name in ("mean_x", "mean_y", "m2_x", "c_xy"):
                value = np.asarray(state[name], dtype=np.float64)
                if value.shape != (out.k,):
                    raise ValueError(f"{name} has shape {value.shape}")
                setattr(out, name, value)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"calibration state is invalid ({exc}): it was not written by OnlineAffine.state_dict") from None
        return out
