"""e-token arithmetic (the e-tokens note): total query energy normalised per 1,000 input or output tokens.

    e-token (input)  = E_Wh / T_in  * 1000      (Wh per 1,000 input tokens)
    e-token (output) = E_Wh / T_out * 1000      (Wh per 1,000 output tokens)
    e_in / e_out     = T_out / T_in              (same energy, two denominators)

E is the whole query: preprocess + prefill + decode. Both variants carry the same physical energy;
neither is "the energy of one token". Bad readings are rejected here, not averaged in: negative or
NaN energy, zero or negative input tokens. Zero output tokens leave e-token (output) undefined
(None, with the reason), never a division by zero.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from metabolic.core.errors import DataError

J_PER_WH = 3600.0
TOKENS_PER_E = 1000  # e-tokens are per 1,000 tokens


def _is_real(value) -> bool:
    """A real number, numpy scalars included (np.float32 readings are valid); bools are not numbers here."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_energy(energy_j: float) -> float:
    if not _is_real(energy_j):
        raise DataError(f"energy {energy_j!r} is not a number: e-tokens need a measured energy in joules "
                        f"(on a machine without a GPU energy is unavailable, so there are no e-tokens)")
    energy_j = float(energy_j)
    if math.isnan(energy_j) or math.isinf(energy_j):
        raise DataError(f"energy {energy_j!r} J is not finite: the meter reading is faulty; re-run the window")
    if energy_j < 0:
        raise DataError(f"energy {energy_j!r} J is negative: the meter reading is faulty (or idle was subtracted "
                        f"from a window shorter than the counter period); re-run with a longer window")
    return energy_j


def _check_tokens(name: str, tokens: int, minimum: int) -> int:
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)):
        raise DataError(f"{name}={tokens!r} is not a whole number of tokens: pass an int")
    if tokens < minimum:
        fix = "a query has at least one input token; check the tokenised prompt" if name == "input_tokens" \
            else "token counts cannot be negative"
        raise DataError(f"{name}={tokens} is invalid: {fix}")
    return int(tokens)


@dataclass(frozen=True)
class ETokens:
    """One query (or the mean query of a window): energy and both e-token values."""

    energy_wh: float
    input_tokens: int
    output_tokens: int
    e_in_wh: float  # Wh per 1,000 input tokens
    e_out_wh: Optional[float]  # Wh per 1,000 output tokens; None when output_tokens == 0
    note: str = ""  # why a value is undefined

    def identity_holds(self, rel: float = 1e-9) -> bool:
        """e_in / e_out == T_out / T_in (vacuously true when e_out is undefined)."""
        if self.e_out_wh is None:
            return True
        if self.e_out_wh == 0:
            return self.e_in_wh == 0
        return math.isclose(self.e_in_wh / self.e_out_wh, self.output_tokens / self.input_tokens, rel_tol=rel)


def etokens(energy_j: float, input_tokens: int, output_tokens: int) -> ETokens:
    """e-tokens of a query that used `energy_j` joules for `input_tokens` in and `output_tokens` out."""
    energy_j = _check_energy(energy_j)
    t_in = _check_tokens("input_tokens", input_tokens, 1)
    t_out = _check_tokens("output_tokens", output_tokens, 0)
    energy_wh = energy_j / J_PER_WH
    e_in = energy_wh / t_in * TOKENS_PER_E
    if t_out == 0:
        return ETokens(energy_wh, t_in, 0, e_in, None,
                       note="e-token (output) undefined: the query produced no output tokens")
    result = ETokens(energy_wh, t_in, t_out, e_in, energy_wh / t_out * TOKENS_PER_E)
    if not result.identity_holds():
        raise DataError(f"e-token identity e_in/e_out = T_out/T_in fails for {result}: this is a bug, please report it")
    return result


@dataclass(frozen=True)
class Spread:
    """Median with spread over repeats; `n` counts the values used, `n_undefined` those left out (None)."""

    median: float
    q25: float
    q75: float
    minimum: float
    maximum: float
    n: int
    n_undefined: int = 0

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25


def spread(values: Iterable[Optional[float]]) -> Optional[Spread]:
    """Median, quartiles and range of the defined values; None when no value is defined. NaN is an error."""
    values = list(values)
    defined = [v for v in values if v is not None]
    for v in defined:
        if not _is_real(v):
            raise DataError(f"a repeat is {v!r}, not a number: pass measured values (None for undefined)")
        if math.isnan(v):  # np.float32("nan") too: it is no `float`
            raise DataError("a repeat is NaN: reject faulty readings before summarising (use None for undefined)")
    if not defined:
        return None
    arr = np.asarray(defined, dtype=np.float64)
    q25, med, q75 = np.quantile(arr, [0.25, 0.5, 0.75])
    return Spread(float(med), float(q25), float(q75), float(arr.min()), float(arr.max()), len(defined),
                  len(values) - len(defined))


def check_rows(rows: Sequence[dict], rel: float = 1e-9) -> int:
    """Check the identity on every result row with energy; return how many rows were checked."""
    checked = 0
    for i, row in enumerate(rows):
        if row.get("e_in_wh") is None or row.get("e_out_wh") is None:
            continue
        if row["e_out_wh"] == 0:
            continue
        t_in = row.get("input_tokens")
        if not _is_real(t_in) or t_in < 1:
            raise DataError(f"row {i}: input_tokens={t_in!r} but the row has e-tokens: a query has at least one input "
                            f"token; the row is corrupt, re-copy it from its machine or measure it again")
        lhs = row["e_in_wh"] / row["e_out_wh"]
        rhs = row["output_tokens"] / row["input_tokens"]
        if not math.isclose(lhs, rhs, rel_tol=rel):
            raise DataError(f"row {i}: e_in/e_out = {lhs!r} but T_out/T_in = {rhs!r}: the row was edited or "
                            f"computed from different energies; recompute it with metabolic.energy.etokens.etokens")
        checked += 1
    return checked
