"""bench_gate_floor.py: a bad --also or --runtimes is a usage error that says what is wrong; its two
gates compute the same function, and the conv gate's ONNX graph is the one its docstring names."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    load_benchmark("bench_spsa_resnet50")  # imported by name beside it (as a script: sys.path[0])
    return load_benchmark("bench_gate_floor")


@pytest.mark.parametrize(("also", "message"), [
    ("old", "expected NAME=FILE"),
    ("=x.onnx", "expected NAME=FILE"),
    ("spsa={file}", "the name 'spsa' is taken"),
    ("conv_gate={file}", "the name 'conv_gate' is taken"),
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


def test_the_two_gates_are_one_function(bench: ModuleType) -> None:
    x = torch.randn(2, 32, 5, 7, generator=torch.Generator().manual_seed(0))
    expected = x * torch.sigmoid(x.sum(1, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(bench.MinimalGate(32)(x), expected)
        torch.testing.assert_close(bench.ConvGate(32)(x), expected)


def test_the_conv_gate_exports_as_constant_weight_convolutions(bench: ModuleType, tmp_path: Path) -> None:
    # the NCHWc optimiser only blocks a Conv whose weight is an initializer: the gate must export so
    import onnx

    from spsa_nas.export import export_onnx

    path = export_onnx(bench.ConvGate(32).eval(), tmp_path / "gate.onnx", (1, 32, 8, 8))
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    assert sorted(ops) == ["Conv", "Conv", "Mul", "Sigmoid"], ops
    initializers = {init.name for init in graph.initializer}
    assert all(node.input[1] in initializers for node in graph.node if node.op_type == "Conv")
