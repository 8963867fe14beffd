"""bench_oneshot.py's statistics on degenerate input: an undefined tau is null, never a crash or NaN."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_oneshot.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_oneshot", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tau_interval_of_constant_accuracies_is_undefined(bench: ModuleType) -> None:
    # every standalone accuracy 1.0 (a saturated budget): no resample has a tau
    assert bench._tau_interval([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], 200, 0) == (None, None)
    low, high = bench._tau_interval([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], 200, 0)
    assert low == high == pytest.approx(1.0)


def test_output_has_no_nan(bench: ModuleType) -> None:
    cleaned = bench.json_safe({"tau": math.nan, "ci": [math.nan, 0.5], "pairs": [{"x": (1.0, math.nan)}]})
    assert cleaned == {"tau": None, "ci": [None, 0.5], "pairs": [{"x": [1.0, None]}]}
    json.loads(json.dumps(cleaned, allow_nan=False))
