"""Verdicts over seeds: the mean effect and its 95% interval, and the rule that turns an interval into a verdict.

An experiment's claim compares two settings run with the same seeds (e.g. BN against no normalization). Each
seed gives one paired ratio ``a_s / b_s`` of a measure; :func:`ratio_interval` is the geometric mean of the
ratios with a Student-t 95% interval on their logarithms (ratios are positive and multiplicative, so the
interval is symmetric in log space: 0.5x and 2x are equally far from 1). :func:`interval_verdict` applies
:data:`INTERVAL_RULE`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# Two-sided 95% quantiles of Student's t by degrees of freedom (n - 1); 1.96 beyond the table.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
_T95.update({11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 30: 2.042})

INTERVAL_RULE = (
    "over the seeds, the per-seed ratios of the two settings give a geometric mean and a 95% Student-t "
    "interval (on log ratios); the claim is held when the whole interval lies on the claimed side of 1, "
    "not held when it lies wholly on the other side, and inconclusive when it contains 1 or fewer than 2 "
    "seeds finished"
)


class Interval(NamedTuple):
    """A mean over seeds and its 95% interval.

    Fields:
      mean: the (geometric, for ratios) mean.
      low, high: the 95% interval's ends (``-inf``/``inf`` when fewer than 2 values).
      n: the number of finite values it was computed from.
    """

    mean: float
    low: float
    high: float
    n: int


def t95(dof: int) -> float:
    """The two-sided 95% quantile of Student's t with ``dof`` degrees of freedom (>= 1)."""
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}.")
    known = [d for d in _T95 if d <= dof]
    return _T95[dof] if dof in _T95 else (1.96 if dof > 30 else _T95[max(known)])


def interval(values: Sequence[float] | np.ndarray) -> Interval:
    """Arithmetic mean and 95% t-interval of the finite ``values`` (non-finite ones, e.g. diverged seeds, are
    left out and not counted in ``n``)."""
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Interval(math.nan, -math.inf, math.inf, 0)
    mean = float(v.mean())
    if v.size < 2:
        return Interval(mean, -math.inf, math.inf, 1)
    half = t95(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return Interval(mean, mean - half, mean + half, int(v.size))


def ratio_interval(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> Interval:
    """Geometric mean of the paired ratios ``a[s] / b[s]`` and its 95% interval (a t-interval of the logs).

    Pairs with a non-finite or non-positive value (a diverged seed) are left out.

    Raises:
      ValueError: if ``a`` and ``b`` differ in length.
    """
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold one value per seed each, got {a.size} and {b.size}.")
    ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    logs = interval(np.log(a[ok] / b[ok]))
    if logs.n == 0:
        return logs
    return Interval(math.exp(logs.mean), math.exp(logs.low), math.exp(logs.high), logs.n)


def interval_verdict(iv: Interval, claimed: str = "below", at: float = 1.0) -> str:
    """``"held"``, ``"not held"`` or ``"inconclusive"`` by :data:`INTERVAL_RULE`: the claim is that the
    effect lies ``claimed`` (``"below"`` or ``"above"``) ``at``."""
    if claimed not in ("below", "above"):
        raise ValueError(f"claimed must be 'below' or 'above', got {claimed!r}.")
    if iv.n < 2:
        return "inconclusive"
    below, above = iv.high < at, iv.low > at
    if claimed == "below":
        return "held" if below else "not held" if above else "inconclusive"
    return "held" if above else "not held" if below else "inconclusive"


def format_mean(values: Sequence[float] | np.ndarray) -> str:
    """A table cell: the mean over seeds [95% interval], ``0.123 [0.101, 0.145]`` (three significant digits; no
    interval with one finished seed, ``diverged`` with none)."""
    iv = interval(values)
    if iv.n == 0:
        return "diverged"
    if iv.n == 1:
        return f"{iv.mean:.3g}"
    return f"{iv.mean:.3g} [{iv.low:.3g}, {iv.high:.3g}]"


def format_ratio(iv: Interval, unit: str = "seed") -> str:
    """``0.46x [0.31, 0.68], 3 seeds`` (three significant digits throughout); ``unit`` names what ``n`` counts
    (``"round"`` for paired timing rounds)."""
    if iv.n == 0:
        return f"no {unit} finished"
    if iv.n == 1:
        return f"{iv.mean:.3g}x, 1 {unit} (no interval)"
    return f"{iv.mean:.3g}x [{iv.low:.3g}, {iv.high:.3g}], {iv.n} {unit}s"


def format_effect(iv: Interval) -> str:
    """The short form for the claims matrix: ``0.46x [0.31, 0.68]`` (``0.46x`` with one seed, ``–`` with none)."""
    if iv.n == 0:
        return "–"
    if iv.n == 1:
        return f"{iv.mean:.2g}x"
    return f"{iv.mean:.2g}x [{iv.low:.2g}, {iv.high:.2g}]"
