"""ONNX export (onnxruntime equals torch) for every backbone x attention, SPSA's graph, safetensors files.

Exports dominate this file's run time (seconds each on this CPU), so instead of one export per
(backbone, attention) pair, each backbone is exported a few times with a different attention in
each stage: every pair of the 8 backbones x 12 attention choices (none, spsa, se, eca, cbam, fca,
simam, spsa+se, SPSA with the forward gate sigmoid(r), SPSA with cosine similarity, the non-local
block, the GC block + ECA) is exported and checked against onnxruntime, in 24 exports instead of 96.
`test_every_pair_is_covered` keeps the table honest.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import get_args

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from spsa_nas.attention import SPSA, spsa_reference
from spsa_nas.attention.gc import GCBlock
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
    # SPSA's ablation switches and the spatial baselines in its place (issue 13)
    "spsa-forward": StageSpec(spsa=True, spsa_reverse=False, spsa_alpha=1.5),
    "spsa-cosine": StageSpec(spsa=True, spsa_similarity="cosine", spsa_heads=2),
    "nonlocal": StageSpec(spatial_attn="nonlocal"),
    "gc+eca": StageSpec(spatial_attn="gc", channel_attn="eca", attn_order="spsa_first"),
}
NAMES = list(VARIANTS)
ALL = list(get_args(Backbone))


def covering_cases(backbones: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """One model per backbone, SPSA (the subject) in its first stage and the other attentions in
    turn in its other stages, so that every backbone and every attention is traced or exported at
    least once by each tracer (not every pair: an attention's graph does not depend on the
    backbone around it, and the full matrix was most of the suite's time); attentions a short
    backbone list leaves over go on extra models of the cheapest backbone, resnet18."""
    others = [name for name in NAMES if name != "spsa"]
    cases, turn = [], 0
    for backbone in backbones:
        stages = len(ArchSpec.plain(backbone).stages)  # type: ignore[arg-type]
        cases.append((backbone, ("spsa", *(others[(turn + j) % len(others)] for j in range(stages - 1)))))
        turn += stages - 1
    left = [name for name in NAMES if all(name not in group for _, group in cases)]
    for start in range(0, len(left), 4):
        cases.append(("resnet18", tuple((left[start:start + 4] + NAMES)[:4])))
    return cases


CASES = covering_cases(ALL)


def test_every_backbone_and_attention_is_covered() -> None:
    assert {backbone for backbone, _ in CASES} == set(ALL)
    assert {name for _, group in CASES for name in group} == set(NAMES)
    assert len(CASES) == len(ALL)  # the backbones' stages are enough for every attention
    assert all(len(group) == len(ArchSpec.plain(b).stages) for b, group in CASES)  # type: ignore[arg-type]
    assert {name for _, group in covering_cases(["shufflenet_v2_x1_0"]) for name in group} == set(NAMES)


def _spec(backbone: str, group: tuple[str, ...]) -> ArchSpec:
    return ArchSpec(backbone=backbone, stages=[VARIANTS[n] for n in group],  # type: ignore[arg-type]
                    stem="cifar", width=0.25, input_size=32, num_classes=10)


def _randomise_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so that the comparison means something;
    the non-local blocks' BN (BatchNorm1d, scale 0 at init) and the GC blocks' last convolution
    (0 at init) too, so that they are not the identity."""
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) * 0.5 + 0.25)
            m.bias.data.copy_(torch.rand(m.num_features, generator=generator) * 0.2 - 0.1)
        elif isinstance(m, GCBlock):
            last = m.transform[-1]
            last.weight.data.copy_(torch.randn(last.weight.shape, generator=generator) * 0.2)


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


def _spsa_graph(tmp_path: Path, heads: int, alpha: float, dynamo: bool) -> onnx.ModelProto:
    """The ONNX graph of one SPSA module on a (2, 16, 8, 8) input, by either exporter."""
    module = SPSA(16, heads=heads, alpha=alpha).eval()
    x = torch.randn(2, 16, 8, 8)
    path = tmp_path / f"spsa_{heads}_{alpha}_{dynamo}.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            export_onnx(module, path, (2, 16, 8, 8))
        else:
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=18,
                              input_names=["input"], output_names=["logits"])
    return onnx.load(str(path))


#: The most nodes one SPSA may export to (dynamo exporter, optimised: export_onnx's default;
#: TorchScript exporter, Constant nodes not counted), the lower bound of composite.spsa_decomposed
#: (alpha 1.5: one Pow more than alpha 1). Raise only with a reason (42/58 before the shift and
#: scale became one BatchNormalization: 6 small nodes for 1/m as a power of two and the reshapes
#: to the norm's channels, against one full-size pass less).
MAX_SPSA_NODES = {True: 49, False: 65}
#: Of those, the nodes that write a full-size tensor (x̃ = (x - s)/m: one BatchNormalization; x̃²;
#: the output), Reshapes (views) not counted, and those that read one without writing one (the
#: key's mean, the three one-row matmuls Σx̃, Σx̃·w, Σx̃²): each is a pass over the tensor.
FULL_SIZE_WRITES = ["BatchNormalization", "Mul", "Mul"]
FULL_SIZE_READS = ["MatMul", "MatMul", "MatMul", "ReduceMean"]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize(("heads", "alpha"), [(1, 1.0), (2, 1.5)])
def test_spsa_onnx_graph_is_a_few_fusable_nodes(tmp_path: Path, heads: int, alpha: float,
                                                dynamo: bool) -> None:
    proto = _spsa_graph(tmp_path, heads, alpha, dynamo)
    ops = [node.op_type for node in proto.graph.node if node.op_type != "Constant"]
    assert len(ops) <= MAX_SPSA_NODES[dynamo] - (alpha == 1.0), ops
    # the channel sums are one-row matmuls (onnxruntime's reductions over a middle axis take a
    # slow generic path); no block-diagonal matmul, no tiling, no gathering
    assert ops.count("MatMul") == 3, ops
    banned = {"ReduceL2", "ReduceSumSquare", "Einsum", "Gather", "ScatterND", "Expand", "Tile"}
    if dynamo:  # (the TorchScript exporter concatenates shapes)
        banned.add("Concat")
    assert not banned & set(ops), ops
    if dynamo:  # static shapes (the TorchScript exporter computes them in the graph)
        inferred = onnx.shape_inference.infer_shapes(proto)
        sizes = {v.name: int(np.prod([d.dim_value for d in v.type.tensor_type.shape.dim]))
                 for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
        full = 2 * 16 * 8 * 8
        writes = sorted(node.op_type for node in proto.graph.node
                        if node.op_type != "Reshape" and any(sizes.get(o) == full for o in node.output))
        reads = sorted(node.op_type for node in proto.graph.node
                       if any(sizes.get(i) == full for i in node.input)
                       and not any(sizes.get(o) == full for o in node.output))
        assert writes == FULL_SIZE_WRITES and reads == FULL_SIZE_READS, (writes, reads)
        matmuls = [node for node in proto.graph.node if node.op_type == "MatMul"]
        assert all(sizes[node.output[0]] == 2 * heads * 64 for node in matmuls)  # (N, G, 1, H·W)
    # the full-size work: the key's mean, the shift and scale, the matmul, the norm, the output
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3)) + 2.0
    x[0, :, 1, 1] = 2.0  # a constant pixel vector
    x[1, :, 2, 2] = 0.0
    got = session.run(None, {"input": x.numpy()})[0]
    expected = spsa_reference(x.double(), alpha, heads).numpy()
    assert np.isfinite(got).all()
    # fp32 one-pass sums: a constant pixel's r is fp32 rounding over the eps floor (up to ~6e-3,
    # as in the eager fused kernel; the two-pass reference gives exactly 0), others agree to ~1e-6
    np.testing.assert_allclose(got, expected, rtol=5e-3, atol=1e-5)
    got[0, :, 1, 1] = expected[0, :, 1, 1]
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-5)


def test_spsa_graph_counted_per_module_in_a_model(tmp_path: Path) -> None:
    """A model's graph grows by at most MAX_SPSA_NODES per SPSA module (the graph cannot quietly grow)."""
    plain = build_model(_spec("resnet18", ("none",) * 4)).eval()
    spsa = build_model(_spec("resnet18", ("spsa",) * 4)).eval()
    nodes = []
    for model, name in ((plain, "plain"), (spsa, "spsa")):
        path = export_onnx(model, tmp_path / f"{name}.onnx", (1, 3, 32, 32))
        nodes.append(len(onnx.load(str(path)).graph.node))
    modules = sum(isinstance(m, SPSA) for m in spsa.modules())
    assert modules == 8
    assert nodes[1] - nodes[0] <= MAX_SPSA_NODES[True] * modules
