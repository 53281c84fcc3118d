"""CSC budgets in one place: the scale a total is on, the band a budget is met within, and the map
from a CSC budget to the model's proxy units. Every stage that totals, scores or spends CSC uses these.

Scale (`csc.scale`, `generation.verified_scales`):
- `raw`: the sum of CSC_t over the tokens that count;
- `length`: that sum times T, the length of the text the labels were computed on (for a generation:
  prompt + generation). Total CSC of a text is nearly flat in its length (per-token CSC falls like
  1/T, README, measured facts), so raw budgets cannot be met by writing more or less; T x CSC_t
  restores totals that grow with content.

Band: an achieved total meets a target within `band` (a fraction, 0.1 = ±10%) when
`|achieved - target| <= band x target`, inclusive, with a relative tolerance of 1e-12 so that a value
exactly on the edge stays in band despite rounding. Hit@delta (Table I), the verified controller's
band and the explorer's gauge all use this one rule.

Budget -> proxy, the one rule (`affine_or_ratio`): the affine map of one sequence total, `csc = a + b x
proxy` (eq. 17, `ProxyCalibration`), where it can turn every budget into a spend > 0 (b > 0, no budget at
or below the intercept), else the ratio map through the origin, `csc = r x proxy`, r = mean CSC / mean
proxy of the same points. Decoding, evaluation and the explorer map a total with it (`ProxyCalibration
.proxy_budgets` keeps an unlimited budget unlimited); training applies it per budget dimension on tensors
(`proxy_budgets_per_dimension`), where a budget below a dimension's intercept asks for no spend (0).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Literal

from metabolic.core.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

# numpy is imported inside the functions that use it: `metabolic.core.config` imports this module and
# must load nothing heavy before `metabolic.core.numerics.pin` has run (a notebook's first cell).

Scale = Literal["raw", "length"]
SCALES: tuple[str, ...] = typing.get_args(Scale)

# Relative tolerance of the band test: a value exactly on the band's edge is a hit despite rounding.
BAND_TOLERANCE = 1e-12


# The names of budget levels: three are low/medium/high (Table I's), any other number B0, B1, ... in ascending order.
LEVELS: tuple[str, ...] = ("low", "medium", "high")


def level_names(n: int) -> tuple[str, ...]:
    """The names of `n` ascending budget levels.

    >>> level_names(3), level_names(2)
    (('low', 'medium', 'high'), ('B0', 'B1'))
    """
    return LEVELS if n == len(LEVELS) else tuple(f"B{i}" for i in range(n))


# --- the scale -------------------------------------------------------------------------------------


def check_scale(scale: str) -> str:
    """`scale` itself when it is one of `SCALES`, else a `ConfigError` naming the choices."""
    if scale not in SCALES:
        raise ConfigError(f"scale={scale!r} is invalid: choose one of {', '.join(SCALES)}")
    return scale


def length_factor(scale: str, length: int) -> int:
    """What a raw CSC total of a text of `length` tokens is multiplied by on `scale`: T, or 1 on `raw`.

    >>> length_factor("length", 12), length_factor("raw", 12)
    (12, 1)
    """
    return length if check_scale(scale) == "length" else 1


# --- the band --------------------------------------------------------------------------------------


def _gap(achieved: Any, target: Any, band: float) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    a = np.asarray(achieved, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    return a - t, t * band * (1 + BAND_TOLERANCE)


def in_band(achieved: Any, target: Any, band: float) -> Any:
    """True where |achieved - target| <= band x target (inclusive; NaN is never in band); arrays broadcast.

    >>> bool(in_band(10.95, 10.0, 0.1)), bool(in_band(11.0, 10.0, 0.1)), bool(in_band(11.05, 10.0, 0.1))
    (True, True, False)
    """
    gap, slack = _gap(achieved, target, band)
    return abs(gap) <= slack  # an ndarray: abs is np.abs


def below_band(achieved: Any, target: Any, band: float) -> Any:
    """True where achieved < target - band x target (outside the band, too cheap)."""
    gap, slack = _gap(achieved, target, band)
    return gap < -slack


def above_band(achieved: Any, target: Any, band: float) -> Any:
    """True where achieved > target + band x target (outside the band, too dear)."""
    gap, slack = _gap(achieved, target, band)
    return gap > slack


# --- budget -> proxy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyCalibration:
    """The proxy <-> CSC map of one sequence total: `csc = a + b * proxy` (eq. 17), b > 0 so budgets invert.

    >>> ProxyCalibration(a=0.1, b=2.0).to_proxy(0.5)
    0.2
    >>> ProxyCalibration(a=0.1, b=2.0).proxy_budgets([0.5, float("inf")]).tolist()
    [0.2, inf]
    """

    a: float
    b: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.a) and math.isfinite(self.b)):
            raise ConfigError(f"calibration (a={self.a!r}, b={self.b!r}) is not finite: refit the calibration")
        if self.b <= 0:
            raise ConfigError(
                f"calibration slope b={self.b!r} is invalid: proxy and CSC must rise together (b > 0); refit the calibration"
            )

    def to_proxy(self, csc: float) -> float:
        return (csc - self.a) / self.b

    def to_csc(self, proxy: float) -> float:
        return self.a + self.b * proxy

    def maps(self, budgets_csc: Iterable[float]) -> bool:
        """True when every CSC budget maps to a proxy budget > 0 (none at or below the intercept, none NaN);
        an unlimited budget (inf) always maps."""
        return all(self.to_proxy(float(b)) > 0 for b in budgets_csc if float(b) != math.inf)

    def proxy_budgets(self, budgets_csc: Any) -> np.ndarray:
        """Each CSC budget in proxy units, float64 [n] (inf = unlimited stays inf); a budget that maps to a
        proxy budget <= 0 is a `ConfigError`."""
        import numpy as np

        values = np.asarray(budgets_csc, dtype=np.float64).reshape(-1)
        proxy = np.array([self.to_proxy(float(b)) if math.isfinite(b) else math.inf for b in values], dtype=np.float64)
        if np.any(proxy <= 0):
            raise ConfigError(
                f"budget_csc={values[proxy <= 0].tolist()} maps to a proxy budget <= 0 through calibration a={self.a:.4g}, "
                f"b={self.b:.4g}: ask for a budget above {self.a:.4g} CSC, or refit the calibration"
            )
        return proxy


def affine_or_ratio(a: float, b: float, ratio: float, budgets_csc: Iterable[float] = (),
                    fit: str = "affine") -> tuple[ProxyCalibration, str]:
    """The budget -> proxy rule (module docstring): the affine map (a, b) when it maps every one of `budgets_csc`
    to a spend > 0, else the ratio map (0, `ratio`); and how it was made (`fit`, the affine map's name, or why not).

    >>> affine_or_ratio(0.1, 2.0, 3.0), affine_or_ratio(0.1, -1.0, 3.0)[1], affine_or_ratio(0.1, 2.0, 3.0, [0.05])[1]
    ((ProxyCalibration(a=0.1, b=2.0), 'affine'), 'ratio (affine slope -1 <= 0)', 'ratio (a budget is below the affine intercept 0.1)')
    """
    budgets_csc = list(budgets_csc)
    calibration = usable_calibration(a, b, budgets_csc)
    if calibration is not None:
        return calibration, fit
    if not (math.isfinite(a) and math.isfinite(b)):
        why = f"{fit} a={a!r}, b={b!r} not finite"
    elif b <= 0:
        why = f"{fit} slope {b:.4g} <= 0"
    else:
        why = f"a budget is below the {fit} intercept {a:.4g}"
    return ProxyCalibration(0.0, float(ratio)), f"ratio ({why})"


def proxy_budgets_per_dimension(budgets_csc: Any, a: Any, b: Any, ratio: Any) -> Any:
    """Training's form of `affine_or_ratio`, per budget dimension k on tensors: CSC budgets [n, K] -> proxy
    budgets [n, K], (B - a_k) / b_k where b_k > 0, else B / ratio_k; floored at 0 (a budget below a dimension's
    intercept asks for no spend: training refits (a_k, b_k) every epoch, so it must not switch maps per row)."""
    import torch

    ok = b > 0
    slope = torch.where(ok, b, ratio)
    return ((budgets_csc - torch.where(ok, a, torch.zeros_like(a))) / slope).clamp_min(0.0)


def usable_calibration(a: float, b: float, budgets_csc: Iterable[float]) -> ProxyCalibration | None:
    """`ProxyCalibration(a, b)` when it is finite, has b > 0 and maps every budget to a proxy budget > 0; else None.

    >>> usable_calibration(0.1, 2.0, [0.5]), usable_calibration(0.1, 2.0, [0.05]), usable_calibration(0.1, -1.0, [0.5])
    (ProxyCalibration(a=0.1, b=2.0), None, None)
    """
    if not (math.isfinite(a) and math.isfinite(b) and b > 0):
        return None
    calibration = ProxyCalibration(float(a), float(b))
    return calibration if calibration.maps(budgets_csc) else None
