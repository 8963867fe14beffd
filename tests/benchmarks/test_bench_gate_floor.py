"""bench_gate_floor.py's arguments: a bad --also or --runtimes is a usage error that says what is wrong."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    load_benchmark("bench_spsa_resnet50")  # imported by name beside it (as a script: sys.path[0])
    return load_benchmark("bench_gate_floor")


@pytest.mark.parametrize(("also", "message"), [
    ("old", "expected NAME=FILE"),
    ("=x.onnx", "expected NAME=FILE"),
    ("spsa={file}", "the name 'spsa' is taken"),
    ("old={missing}", "no such file"),
])
def test_bad_also_is_a_usage_error(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   also: str, message: str) -> None:
    graph = tmp_path / "g.onnx"
    graph.write_bytes(b"")
    value = also.format(file=graph, missing=tmp_path / "missing.onnx")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--also", value, "--rounds", "3"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_the_same_also_name_twice_is_a_usage_error(bench: ModuleType, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    graph = tmp_path / "g.onnx"
    graph.write_bytes(b"")
    with pytest.raises(SystemExit):
        bench.main(["--also", f"old={graph}", "--also", f"old={graph}"])
    assert "the name 'old' is taken" in capsys.readouterr().err


def test_unknown_runtime_is_a_usage_error(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--runtimes", "tensorrt"])
    assert "--runtimes: unknown ['tensorrt']" in capsys.readouterr().err
