"""Kendall's tau for the ranking benchmarks (None where undefined), its bootstrap interval, the seed noise."""

from __future__ import annotations

import random
import statistics

from scipy.stats import kendalltau


def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b of paired lists; None where it is undefined (fewer than two pairs, or either
    side constant), so that no NaN and no scipy warning reaches the output."""
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(kendalltau(x, y).statistic)


def ci95(values: list[float]) -> tuple[float | None, float | None]:
    """The 95 % interval of bootstrap values; (None, None) without any."""
    values = sorted(values)
    if not values:
        return None, None
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def tau_interval(x: list[float], y: list[float], reps: int, seed: int) -> tuple[float | None, float | None]:
    """The 95 % bootstrap interval of kendall_tau(x, y), pairs resampled; resamples where tau is
    undefined (a constant side) are left out, (None, None) when every one is."""
    rng = random.Random(seed)
    n, taus = len(x), []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        tau = kendall_tau([x[i] for i in idx], [y[i] for i in idx])
        if tau is not None:
            taus.append(tau)
    return ci95(taus)


def seed_noise_sd(standalone: list[list[float]]) -> float | None:
    """The seed-to-seed standard deviation of per-architecture accuracies (the root of the mean
    per-architecture variance); None under 2 seeds."""
    if min(len(a) for a in standalone) < 2:
        return None
    return statistics.fmean(statistics.variance(a) for a in standalone) ** 0.5
