"""Kendall's tau for the ranking benchmarks, None where it is undefined (never NaN, never scipy's warning)."""

from __future__ import annotations

from scipy.stats import kendalltau


def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b of paired lists; None where it is undefined (fewer than two pairs, or either
    side constant), so that no NaN and no scipy warning reaches the output."""
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(kendalltau(x, y).statistic)
