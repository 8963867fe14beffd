"""Every standard way to trace or export a model works on every backbone family x attention, equal to eager.

torch.jit.trace, torch.jit.script, torch.fx.symbolic_trace, torchvision's create_feature_extractor,
torch.export, the TorchScript ONNX exporter (run by onnxruntime) and AOTInductor. The dynamo ONNX
exporter is covered by tests/spsa_nas/test_export.py (export_onnx uses it). As in test_export, each
backbone is traced once, SPSA in its first stage and other attentions in the rest, so that every
backbone and every attention is covered by each tracer (test_export.covering_cases). Backbones:
one of each block family (basic ResNet, bottleneck ResNet, grouped ResNeXt, MobileNetV2,
ShuffleNetV2); resnet34, 101 and 152 differ from these only in depth.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from spsa_nas.attention import SPSA
from spsa_nas.models import build_model
from spsa_nas.spec import ArchSpec
from tests.spsa_nas.test_export import (  # every attention variant, one list
    NAMES,
    VARIANTS,
    _randomise_bn,
    covering_cases,
)

BACKBONES = ["resnet18", "resnet50", "resnext50_32x4d", "mobilenet_v2", "shufflenet_v2_x1_0"]


CASES = covering_cases(BACKBONES)
IDS = [f"{b}-{'/'.join(g)}" for b, g in CASES]


def test_every_backbone_and_attention_is_covered() -> None:
    """Each tracer below sees every backbone and every attention (test_export.covering_cases)."""
    assert {b for b, _ in CASES} == set(BACKBONES)
    assert {n for _, g in CASES for n in g} == set(NAMES)


def _model(backbone: str, group: tuple[str, ...]) -> torch.nn.Module:
    spec = ArchSpec(backbone=backbone, stages=[VARIANTS[n] for n in group],  # type: ignore[arg-type]
                    stem="cifar", width=0.25, input_size=32, num_classes=10)
    model = build_model(spec)
    _randomise_bn(model)  # non-trivial BN and NL/GC blocks, so that a wrong graph moves the logits
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, 0, 0.5)
    return model.eval()


def _input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer warnings


@pytest.mark.parametrize(("backbone", "group"), CASES, ids=IDS)
def test_jit_trace_script_fx_and_export_equal_eager(backbone: str, group: tuple[str, ...]) -> None:
    model, x = _model(backbone, group), _input()
    with torch.no_grad():
        expected = model(x)
        traced = torch.jit.trace(model, x)
        _close(traced(x), expected)
        _close(traced(x * 0.5), model(x * 0.5))  # the trace is not a recording of one input
        scripted = torch.jit.script(model)
        _close(scripted(x), expected)
        graph = torch.fx.symbolic_trace(model)
        _close(graph(x), expected)
        exported = torch.export.export(model, (x,))
        _close(exported.module()(x), expected)
    uses_spsa = any(isinstance(m, SPSA) for m in model.modules())
    # torch.export keeps SPSA as the one custom op; TorchScript gets its plain operators
    ops = {str(node.target) for node in exported.graph.nodes}
    assert ("spsa_nas.spsa.default" in ops) == uses_spsa
    assert "spsa_nas::" not in str(traced.graph)


@pytest.mark.parametrize(("backbone", "group"), CASES, ids=IDS)
def test_create_feature_extractor(backbone: str, group: tuple[str, ...]) -> None:
    model, x = _model(backbone, group), _input()
    _, nodes = get_graph_node_names(model)
    assert not any(n.endswith(("check_input", "_check_input")) for n in nodes)
    names = [n for n in nodes if n.endswith(".attn.spsa.spsa") or n.endswith(".spsa.spsa")]
    assert bool(names) == any(isinstance(m, SPSA) for m in model.modules())
    returned = {nodes[-1]: "logits", **({names[-1]: "spsa"} if names else {})}
    extractor = create_feature_extractor(model, return_nodes=returned)
    seen: list[torch.Tensor] = []
    spsa_modules = [m for m in model.modules() if isinstance(m, SPSA)]
    handle = spsa_modules[-1].register_forward_hook(lambda m, i, o: seen.append(o)) if spsa_modules else None
    with torch.no_grad():
        expected = model(x)
        features = extractor(x)
    if handle is not None:
        handle.remove()
        _close(features["spsa"], seen[-1])
    _close(features["logits"], expected)


def _torchscript_onnx(model: torch.nn.Module, x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=18, input_names=["input"],
                      output_names=["logits"])
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize(("backbone", "group"), CASES, ids=IDS)
def test_torchscript_onnx_exporter_runs_in_onnxruntime(backbone: str, group: tuple[str, ...]) -> None:
    model, x = _model(backbone, group), _input()
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(_torchscript_onnx(model, x), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_traces_of_a_training_model_equal_eager() -> None:
    """In training mode (batch statistics, SPSA's recomputation off while tracing) too."""
    model, x = _model("resnet18", ("spsa+se", "spsa", "fca", "cbam")), _input()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(x)
    for traced in (torch.fx.symbolic_trace(model), torch.jit.trace(model, x, check_trace=False)):
        model.load_state_dict(state)  # the running statistics each forward updates
        _close(traced(x), expected)


@pytest.mark.slow
def test_aot_inductor_package_equals_eager(tmp_path: Path) -> None:
    """torch.export -> AOTInductor (C++ compiled here, ~1 min): SPSA stays the custom op."""
    model, x = _model("resnet18", ("spsa+se", "spsa", "none", "eca")), _input()
    with torch.no_grad():
        expected = model(x)
    program = torch.export.export(model, (x,))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "m.pt2"))
    loaded = torch._inductor.aoti_load_package(package)
    with torch.no_grad():
        _close(loaded(x), expected)
