"""bench_oneshot.py's statistics on degenerate input: an undefined tau is null, never a crash or NaN."""

from __future__ import annotations

import json
import math
from types import ModuleType

import pytest
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_oneshot")


def test_tau_interval_of_constant_accuracies_is_undefined(bench: ModuleType) -> None:
    # every standalone accuracy 1.0 (a saturated budget): no resample has a tau
    assert bench._tau_interval([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], 200, 0) == (None, None)
    low, high = bench._tau_interval([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], 200, 0)
    assert low == high == pytest.approx(1.0)


def test_output_has_no_nan(bench: ModuleType) -> None:
    cleaned = bench.json_safe({"tau": math.nan, "ci": [math.nan, 0.5], "pairs": [{"x": (1.0, math.nan)}]})
    assert cleaned == {"tau": None, "ci": [None, 0.5], "pairs": [{"x": [1.0, None]}]}
    json.loads(json.dumps(cleaned, allow_nan=False))
