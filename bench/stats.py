"""The two statistics every benchmark uses."""

from __future__ import annotations


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]
