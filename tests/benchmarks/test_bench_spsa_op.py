"""bench_spsa_op.py: its JSON says which allocator regime its allocating ratios were measured in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from bench_loader import BENCHMARKS


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    # a subprocess: --warm-heap changes the allocator of the process it runs in
    return subprocess.run([sys.executable, str(BENCHMARKS / "bench_spsa_op.py"), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--warm-heap sets glibc's mallopt (Linux)")
def test_warm_heap_is_recorded_beside_the_figures() -> None:
    warm = _run("--quick", "--warm-heap")
    assert warm.returncode == 0, warm.stderr[-2000:]
    report = json.loads(warm.stdout)
    assert report["allocator"].startswith("glibc heap: mmap threshold 32 MiB")
    (shape,) = report["shapes"].values()
    assert set(shape) == {"nchw", "channels_last"}
    assert all(v["median_ms"]["fused"] > 0 and v["median_ms"]["copy"] > 0 for v in shape.values())
    plain = _run("--quick")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert json.loads(plain.stdout)["allocator"] == "default"
