"""The two statistics every benchmark uses."""

from __future__ import annotations

import statistics


def median(values: list[float]) -> float:
    """The median (of an even count: the mean of the middle two)."""
    return float(statistics.median(values))


def pct(values: list[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value at or above a fraction `q` of them."""
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]
