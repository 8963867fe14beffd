"""The SPSA ResNet-50 benchmark script runs (smoke mode) and prints JSON with the expected keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_spsa_resnet50.py"


@pytest.mark.slow
def test_quick_benchmark_prints_its_report_as_json() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["quick"] is True and report["device"] == "cpu"
    (config,) = report["configs"].values()
    eager = config["inference"]["eager"]
    assert set(eager["variants"]) == {"plain", "spsa_fast", "spsa_reference", "se", "eca"}
    assert eager["ratio_to_plain"]["plain"] == 1.0
    assert all(v["img_per_s"] > 0 for v in eager["variants"].values())
    assert "skipped" in config["inference"]["compiled"]
    train = config["training"]
    assert set(train["variants"]) == {"plain", "spsa_fast"}
    for figures in train["variants"].values():
        assert figures["step_ms"] > 0 and figures["saved_for_backward_bytes"] > 0
        assert isinstance(figures["peak_bytes"], int)
    (targets,) = report["targets"].values()
    assert set(targets) == {"compiled_spsa_throughput_ratio", "eager_fast_spsa_throughput_ratio",
                            "train_peak_memory_ratio"}
    assert targets["compiled_spsa_throughput_ratio"]["met"] is None


def test_bad_arguments_are_refused() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--compile-variants", "plain,bogus"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 2
    assert "--compile-variants" in run.stderr and "spsa_fast" in run.stderr
