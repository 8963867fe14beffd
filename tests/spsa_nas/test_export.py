"""ONNX export (onnxruntime equals torch) for every backbone x attention, and safetensors round trips.

Exports dominate this file's run time (seconds each on this CPU), so instead of one export per
(backbone, attention) pair, each backbone is exported a few times with a different attention in
each stage: every pair of the 8 backbones x 8 attention choices (none, spsa, se, eca, cbam, fca,
simam, spsa+se) is exported and checked against onnxruntime, in 17 exports instead of 64.
`test_every_pair_is_covered` keeps the table honest.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from spsa_nas.export import SPEC_METADATA_KEY, export_onnx, load_spec, load_state_dict_file, save_safetensors
from spsa_nas.models import build_model
from spsa_nas.spec import ArchSpec, Backbone, StageSpec

VARIANTS: dict[str, StageSpec] = {
    "none": StageSpec(),
    "spsa": StageSpec(spsa=True, spsa_alpha=2.0),
    "se": StageSpec(channel_attn="se"),
    "eca": StageSpec(channel_attn="eca"),
    "cbam": StageSpec(channel_attn="cbam"),
    "fca": StageSpec(channel_attn="fca"),
    "simam": StageSpec(channel_attn="simam"),
    "spsa+se": StageSpec(spsa=True, spsa_heads=2, channel_attn="se", attn_order="spsa_first"),
}
NAMES = list(VARIANTS)
ALL = list(get_args(Backbone))


def _groups(stages: int) -> list[list[str]]:
    """The attention names of each export: consecutive chunks of NAMES, the last one padded."""
    chunks = [NAMES[i:i + stages] for i in range(0, len(NAMES), stages)]
    chunks[-1] += NAMES[: stages - len(chunks[-1])]
    return chunks


CASES = [(backbone, tuple(group)) for backbone in ALL
         for group in _groups(len(ArchSpec.plain(backbone).stages))]


def test_every_pair_is_covered() -> None:
    covered = {(backbone, name) for backbone, group in CASES for name in group}
    assert covered == {(b, n) for b in ALL for n in NAMES}
    assert len(CASES) == 17


def _spec(backbone: str, group: tuple[str, ...]) -> ArchSpec:
    return ArchSpec(backbone=backbone, stages=[VARIANTS[n] for n in group],  # type: ignore[arg-type]
                    stem="cifar", width=0.25, input_size=32, num_classes=10)


def _randomise_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so that the comparison means something."""
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) * 0.5 + 0.25)
            m.bias.data.copy_(torch.rand(m.num_features, generator=generator) * 0.2 - 0.1)


def _onnx_outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.slow
@pytest.mark.parametrize("backbone,group", CASES, ids=[f"{b}-{'/'.join(g)}" for b, g in CASES])
def test_onnx_export_matches_torch(tmp_path: Path, backbone: str, group: tuple[str, ...]) -> None:
    spec = _spec(backbone, group)
    model = build_model(spec)
    _randomise_bn(model)
    model.train()
    path = export_onnx(model, tmp_path / "model.onnx", (2, 3, 32, 32), optimize=False)
    assert model.training  # restored
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x).numpy()
    got = _onnx_outputs(path, x)
    assert got.shape == (2, 10)
    assert np.isfinite(got).all()
    # fp32 through up to 150 layers: differences of ~1e-4 relative are rounding, not a bug (a
    # wrongly exported attention moves the logits by percents)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_default_export_is_optimised_and_carries_the_spec(tmp_path: Path) -> None:
    spec = _spec("resnet18", ("spsa+se", "fca", "none", "spsa"))
    model = build_model(spec).eval()
    path = export_onnx(model, tmp_path / "sub" / "m.onnx")  # the input size the spec is for
    proto = onnx.load(str(path))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [
        1, 3, spec.input_size, spec.input_size]
    onnx.checker.check_model(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    assert ArchSpec.model_validate_json(props[SPEC_METADATA_KEY]) == spec
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(_onnx_outputs(path, x), model(x).numpy(), rtol=1e-4, atol=1e-6)


def test_export_refuses_a_wrong_input_shape(tmp_path: Path) -> None:
    model = build_model(_spec("resnet18", ("none",) * 4))
    with pytest.raises(ValueError, match="1 channels; the model takes 3"):
        export_onnx(model, tmp_path / "m.onnx", (1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        export_onnx(model, tmp_path / "m.onnx", (3, 32, 32))
    with pytest.raises(ValueError, match="pass input_shape"):
        export_onnx(torch.nn.Conv2d(3, 4, 3), tmp_path / "m.onnx")


@pytest.mark.parametrize("backbone", ["resnet50", "mobilenet_v2", "shufflenet_v2_x1_0"])
def test_safetensors_round_trip(tmp_path: Path, backbone: str) -> None:
    spec = ArchSpec.uniform(backbone, VARIANTS["spsa+se"] if backbone != "shufflenet_v2_x1_0"
                            else StageSpec(spsa=True, channel_attn="fca"),
                            stem="cifar", width=0.25, input_size=32, num_classes=10)
    model = build_model(spec)
    _randomise_bn(model)
    model.eval()
    path = save_safetensors(model, tmp_path / "w.safetensors")
    assert load_spec(path) == spec
    state = load_state_dict_file(path)
    assert state.keys() == model.state_dict().keys()
    rebuilt = build_model(load_spec(path), weights=path).eval()
    report = rebuilt.load_report
    assert report.initialised == [] and report.unexpected == [] and report.mismatched == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_safetensors_without_a_spec_and_bad_files(tmp_path: Path) -> None:
    plain = torch.nn.Linear(2, 2)
    path = save_safetensors(plain, tmp_path / "plain.safetensors")
    assert load_spec(path) is None
    assert set(load_state_dict_file(path)) == {"weight", "bias"}
    with pytest.raises(ValueError, match=r"missing\.safetensors: no such file"):
        load_spec(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ValueError, match=r"bad\.safetensors: not a readable safetensors"):
        load_spec(bad)
