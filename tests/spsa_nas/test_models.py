"""Backbones built from an ArchSpec: torchvision equality, stems, widths, attention placement."""

from __future__ import annotations

import re
from typing import get_args

import pytest
import torch
import torchvision
from torch import nn

from spsa_nas.models import BACKBONES, BlockAttention, build_model, eca_adaptive_kernel
from spsa_nas.spec import ArchSpec, Backbone, StageSpec

ALL = list(get_args(Backbone))


def test_registry_covers_every_backbone_of_the_spec() -> None:
    assert sorted(BACKBONES) == sorted(ALL)


@pytest.mark.parametrize("backbone", ALL)
def test_plain_model_has_torchvisions_keys_and_shapes(backbone: str) -> None:
    with torch.device("meta"):  # shapes only: skip allocating and initialising the weights
        ours = build_model(ArchSpec.plain(backbone)).state_dict()
        theirs = getattr(torchvision.models, backbone)(weights=None).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("backbone", ALL)
def test_torchvision_weights_load_and_give_identical_outputs(backbone: str) -> None:
    torch.manual_seed(0)
    reference = getattr(torchvision.models, backbone)(weights=None).eval()
    # make the BN statistics non-trivial so that a mis-wired BN would show
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model = build_model(ArchSpec.plain(backbone), weights=reference.state_dict()).eval()
    report = model.load_report
    assert report.initialised == [] and report.unexpected == [] and report.mismatched == []
    assert len(report.loaded) == len(reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_model_carries_its_spec_and_no_report_without_weights() -> None:
    spec = ArchSpec.plain("resnet18", num_classes=10, stem="cifar", width=0.25, input_size=32)
    model = build_model(spec)
    assert model.spec is spec
    assert model.load_report is None


def test_build_model_rejects_what_is_not_a_spec() -> None:
    with pytest.raises(TypeError, match="ArchSpec"):
        build_model({"backbone": "resnet18"})  # type: ignore[arg-type]


def _stage_outputs(model: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """The module whose output is each stage's output."""
    out = {}
    for info in spec.stage_info():
        if info.name.startswith("features."):
            last = info.name.split(".")[1].split("-")[-1]
            out[info.name] = model.features[int(last)]
        else:
            out[info.name] = getattr(model, info.name)
    return out


@pytest.mark.parametrize("backbone", ALL)
@pytest.mark.parametrize("stem,size", [("cifar", 32), ("imagenet", 64)])
def test_stem_and_feature_sizes_match_the_spec(backbone: str, stem: str, size: int) -> None:
    spec = ArchSpec.plain(backbone, stem=stem, input_size=size, width=0.25, num_classes=7, in_channels=1)
    model = build_model(spec).eval()
    sizes: list[int] = []
    for module in _stage_outputs(model, spec).values():
        module.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    with torch.no_grad():
        y = model(torch.randn(2, 1, size, size))
    assert y.shape == (2, 7)
    assert tuple(sizes) == spec.feature_sizes()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    if stem == "cifar":
        assert first.stride == (1, 1)
        if backbone != "mobilenet_v2":
            assert first.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)


def _stage_of(name: str, spec: ArchSpec) -> int:
    """Index of the stage a block (given by its module name) belongs to."""
    for i, info in enumerate(spec.stage_info()):
        if info.name.startswith("features."):
            bounds = [int(b) for b in info.name.split(".")[1].split("-")]
            index = int(name.split(".")[1])
            if bounds[0] <= index <= bounds[-1]:
                return i
        elif name.split(".")[0] == info.name:
            return i
    raise AssertionError(f"{name} is in no stage")


@pytest.mark.parametrize("backbone", ALL)
@pytest.mark.parametrize("width", [0.25, 0.5, 1.0])
def test_attention_channels_equal_the_stage_table(backbone: str, width: float) -> None:
    spec = ArchSpec.uniform(backbone, StageSpec(spsa=True),
                            width=width, input_size=16)
    model = build_model(spec).eval()
    seen: dict[int, set[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, BlockAttention):
            stage = _stage_of(name, spec)
            module.register_forward_pre_hook(
                lambda m, i, stage=stage: seen.setdefault(stage, set()).add(i[0].shape[1])
            )
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))
    expected = {i: {info.channels} for i, info in enumerate(spec.stage_info())}
    assert seen == expected
    blocks = sum(info.blocks for info in spec.stage_info())
    assert sum(isinstance(m, BlockAttention) for m in model.modules()) == blocks


def _capture(module: nn.Module, store: dict[str, torch.Tensor], key: str, pre: bool = False) -> None:
    if pre:
        module.register_forward_pre_hook(lambda m, i: store.__setitem__(key, i[0].clone()))
    else:
        module.register_forward_hook(lambda m, i, o: store.__setitem__(key, o.clone()))


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_resnet_attention_sits_after_the_last_bn_before_the_addition(backbone: str) -> None:
    spec = ArchSpec.uniform(backbone, StageSpec(spsa=True, channel_attn="se"), stem="cifar",
                            width=0.25, input_size=16)
    model = build_model(spec).eval()
    block = model.layer2[0]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    seen: dict[str, torch.Tensor] = {}
    _capture(last_bn, seen, "bn")
    _capture(block.attn, seen, "attn_in", pre=True)
    _capture(block.attn, seen, "attn_out")
    _capture(block.downsample, seen, "identity")
    _capture(block, seen, "block")
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert torch.equal(seen["attn_in"], seen["bn"])
    assert not torch.equal(seen["attn_out"], seen["attn_in"])
    assert torch.allclose(seen["block"], torch.relu(seen["attn_out"] + seen["identity"]))


def test_mobilenet_attention_after_projection_bn_before_residual() -> None:
    spec = ArchSpec.uniform("mobilenet_v2", StageSpec(spsa=True), stem="cifar", width=0.25,
                            input_size=16)
    model = build_model(spec).eval()
    residual, plain = model.features[3], model.features[2]  # stage 2: block 1 adds, block 0 not
    assert residual.use_res_connect and not plain.use_res_connect
    seen: dict[str, torch.Tensor] = {}
    for key, block in (("res", residual), ("plain", plain)):
        _capture(block.conv[-1], seen, f"{key}_bn")
        _capture(block.attn, seen, f"{key}_attn_in", pre=True)
        _capture(block.attn, seen, f"{key}_attn_out")
        _capture(block, seen, f"{key}_in", pre=True)
        _capture(block, seen, f"{key}_out")
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    for key in ("res", "plain"):
        assert torch.equal(seen[f"{key}_attn_in"], seen[f"{key}_bn"])
    assert torch.allclose(seen["res_out"], seen["res_in"] + seen["res_attn_out"])
    assert torch.equal(seen["plain_out"], seen["plain_attn_out"])


def test_shufflenet_attention_on_the_right_branch_before_concat_and_shuffle() -> None:
    spec = ArchSpec.uniform("shufflenet_v2_x1_0", StageSpec(spsa=True), stem="cifar", width=0.25,
                            input_size=16)
    model = build_model(spec).eval()
    block = model.stage3[1]  # a stride-1 block: left half passes through
    seen: dict[str, torch.Tensor] = {}
    _capture(block.branch2, seen, "branch")
    _capture(block.attn, seen, "attn_in", pre=True)
    _capture(block.attn, seen, "attn_out")
    _capture(block, seen, "in", pre=True)
    _capture(block, seen, "out")
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert torch.equal(seen["attn_in"], seen["branch"])
    left = seen["in"].chunk(2, dim=1)[0]
    merged = torch.cat((left, seen["attn_out"]), dim=1)
    n, c, h, w = merged.shape
    shuffled = merged.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
    assert torch.equal(seen["out"], shuffled)


@pytest.mark.parametrize("order,expected", [("channel_first", ["channel", "spsa"]),
                                            ("spsa_first", ["spsa", "channel"])])
def test_attention_order_follows_the_spec(order: str, expected: list[str]) -> None:
    spec = ArchSpec.uniform("resnet18", StageSpec(spsa=True, channel_attn="eca", attn_order=order),
                            stem="cifar", width=0.25, input_size=16)
    model = build_model(spec).eval()
    attn = model.layer1[0].attn
    calls: list[str] = []
    attn.channel.register_forward_hook(lambda m, i, o: calls.append("channel"))
    attn.spsa.register_forward_hook(lambda m, i, o: calls.append("spsa"))
    with torch.no_grad():
        attn(torch.randn(2, spec.stage_info()[0].channels, 4, 4))
    assert calls == expected


def test_stage_without_attention_has_identity_and_no_extra_keys() -> None:
    stages = [StageSpec(channel_attn="se"), StageSpec(), StageSpec(spsa=True), StageSpec()]
    spec = ArchSpec(backbone="resnet18", stages=stages, stem="cifar", width=0.25, input_size=16)
    model = build_model(spec)
    assert isinstance(model.layer2[0].attn, nn.Identity)
    assert isinstance(model.layer1[1].attn, BlockAttention)
    assert model.layer3[0].attn.channel is None
    extra = [k for k in model.state_dict() if ".attn." in k]
    assert extra and all(k.startswith("layer1.") for k in extra)
    assert any(k.startswith("layer1.0.attn.channel.") for k in extra)


def test_eca_kernel_per_stage() -> None:
    resnet = build_model(ArchSpec.uniform("resnet50", StageSpec(channel_attn="eca"), width=0.25,
                                          stem="cifar", input_size=32))
    mobile = build_model(ArchSpec.uniform("mobilenet_v2", StageSpec(channel_attn="eca"),
                                          stem="cifar", input_size=32))

    def kernels(model: nn.Module) -> list[int]:
        return [m.kernel_size[0] for n, m in model.named_modules()
                if isinstance(m, nn.Conv1d) and ".attn." in f".{n}"]

    per_block = [k for k, n in zip((3, 5, 5, 7), (3, 4, 6, 3), strict=True) for _ in range(n)]
    assert kernels(resnet) == per_block
    mobile_expected = [eca_adaptive_kernel(info.channels) for info in mobile.spec.stage_info()
                       for _ in range(info.blocks)]
    assert kernels(mobile) == mobile_expected
    assert [eca_adaptive_kernel(c) for c in (16, 24, 64, 320, 1024)] == [3, 3, 3, 5, 5]


def test_fca_dct_size_follows_the_feature_size(monkeypatch: pytest.MonkeyPatch) -> None:
    import spsa_nas.models._attn as attn_module

    calls: list[tuple[str, int, dict]] = []
    real = attn_module.create_attention

    def recording(name: str, channels: int, **options: int) -> nn.Module:
        calls.append((name, channels, options))
        return real(name, channels, **options)

    monkeypatch.setattr(attn_module, "create_attention", recording)
    for size, expected in ((224, [56, 28, 14, 7]), (32, [32, 16, 8, 7])):
        calls.clear()
        stem = "imagenet" if size == 224 else "cifar"
        spec = ArchSpec.uniform("resnet18", StageSpec(channel_attn="fca"), stem=stem,
                                input_size=size, width=0.25)
        build_model(spec)
        assert [c[2] for c in calls] == [{"dct_size": d} for d in expected for _ in range(2)]
        assert [c[1] for c in calls] == [i.channels for i in spec.stage_info() for _ in range(2)]


@pytest.mark.parametrize("backbone", ALL)
def test_hybrid_models_are_finite_at_init_in_train_and_eval(backbone: str) -> None:
    spec = ArchSpec.uniform(backbone, StageSpec(spsa=True, channel_attn="se"), stem="cifar",
                            width=0.25, input_size=16, num_classes=5)
    model = build_model(spec)
    x = torch.randn(4, 3, 16, 16)
    y = model(x)
    y.sum().backward()
    assert y.shape == (4, 5) and torch.isfinite(y).all()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters the loss does not reach: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())  # type: ignore[arg-type]
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 3, 16, 16))).all()


def test_attention_modules_are_named_under_attn() -> None:
    spec = ArchSpec.uniform("resnet50", StageSpec(spsa=True, channel_attn="se"), width=0.25,
                            stem="cifar", input_size=16)
    keys = [k for k in build_model(spec).state_dict() if ".attn." in k]
    assert keys and all(re.match(r"layer\d\.\d+\.attn\.channel\.", k) for k in keys)


# -- the spatial baselines in SPSA's place and SPSA's ablation switches (issue 13) ------------------

SPATIAL_VARIANTS: dict[str, StageSpec] = {
    "nonlocal": StageSpec(spatial_attn="nonlocal"),
    "gc+se": StageSpec(spatial_attn="gc", channel_attn="se", attn_order="spsa_first"),
    "spsa-forward": StageSpec(spsa=True, spsa_reverse=False, spsa_heads=2),
    "spsa-cosine": StageSpec(spsa=True, spsa_similarity="cosine", channel_attn="eca"),
}


def _spatial_groups(stages: int) -> list[tuple[str, ...]]:
    names = list(SPATIAL_VARIANTS)
    chunks = [names[i:i + stages] for i in range(0, len(names), stages)]
    chunks[-1] += names[: stages - len(chunks[-1])]
    return [tuple(chunk) for chunk in chunks]


SPATIAL_CASES = [(b, g) for b in ALL for g in _spatial_groups(len(ArchSpec.plain(b).stages))]


def test_every_backbone_meets_every_new_choice() -> None:
    assert {(b, n) for b, g in SPATIAL_CASES for n in g} == {(b, n) for b in ALL for n in SPATIAL_VARIANTS}


def _randomise_spatial(model: nn.Module) -> None:
    """Non-zero last layers in the non-local and GC blocks (they start as the identity)."""
    from spsa_nas.attention.gc import GCBlock
    from spsa_nas.attention.nonlocal_block import NonLocalBlock

    generator = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, NonLocalBlock):
            m.bn.weight.data.copy_(torch.rand(m.bn.num_features, generator=generator) + 0.5)
        elif isinstance(m, GCBlock):
            last = m.transform[-1]
            last.weight.data.copy_(torch.randn(last.weight.shape, generator=generator) * 0.5)


@pytest.mark.parametrize(("backbone", "group"), SPATIAL_CASES,
                         ids=[f"{b}-{'/'.join(g)}" for b, g in SPATIAL_CASES])
def test_new_spatial_choices_build_and_train_on_every_backbone(backbone: str, group: tuple[str, ...]) -> None:
    spec = ArchSpec(backbone=backbone, stages=[SPATIAL_VARIANTS[n] for n in group],  # type: ignore[arg-type]
                    stem="cifar", width=0.25, input_size=16, num_classes=5)
    model = build_model(spec)
    _randomise_spatial(model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = model(x)
    y.sum().backward()
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters the loss does not reach: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())  # type: ignore[arg-type]
    keys = [k for k in model.state_dict() if ".attn.spatial." in k]
    assert bool(keys) == any(n in ("nonlocal", "gc+se") for n in group)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("choice", ["nonlocal", "gc"])
def test_spatial_block_sits_where_spsa_sits_and_starts_as_the_identity(choice: str) -> None:
    from spsa_nas.attention.gc import GCBlock
    from spsa_nas.attention.nonlocal_block import NonLocalBlock

    kind = {"nonlocal": NonLocalBlock, "gc": GCBlock}[choice]
    spec = ArchSpec.uniform("resnet18", StageSpec(spatial_attn=choice, channel_attn="se"), stem="cifar",
                            width=0.25, input_size=16)
    model = build_model(spec).eval()
    attn = model.layer2[0].attn
    assert isinstance(attn, BlockAttention) and isinstance(attn.spatial, kind) and attn.spsa is None
    assert sum(isinstance(m, kind) for m in model.modules()) == 8  # every block, as SPSA
    keys = [k for k in model.state_dict() if ".attn." in k]
    assert keys and all(re.match(r"layer\d\.\d+\.attn\.(channel|spatial)\.", k) for k in keys)
    # channel_first: channel attention, then the spatial block, on bn2's output
    calls: list[str] = []
    attn.channel.register_forward_hook(lambda m, i, o: calls.append("channel"))
    attn.spatial.register_forward_hook(lambda m, i, o: calls.append("spatial"))
    block = model.layer2[0]
    seen: dict[str, torch.Tensor] = {}
    _capture(block.bn2, seen, "bn")
    _capture(block.attn, seen, "attn_in", pre=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert calls == ["channel", "spatial"]
    assert torch.equal(seen["attn_in"], seen["bn"])
    # the backbone's initialisation leaves the block's own: a new block is the identity, so the
    # model equals the one without it on the same backbone weights
    plain_spec = ArchSpec.uniform("resnet18", StageSpec(channel_attn="se"), stem="cifar", width=0.25,
                                  input_size=16)
    plain = build_model(plain_spec).eval()
    ours = build_model(spec, weights=plain.state_dict()).eval()
    assert all(".attn.spatial." in k for k in ours.load_report.initialised)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ours(x), plain(x))


def test_spsa_switches_reach_the_module() -> None:
    from spsa_nas.attention import SPSA

    spec = ArchSpec(backbone="resnet18", stem="cifar", width=0.25, input_size=16,
                    stages=[StageSpec(spsa=True, spsa_reverse=False),
                            StageSpec(spsa=True, spsa_similarity="cosine"), StageSpec(spsa=True),
                            StageSpec()])
    model = build_model(spec).eval()
    x = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(4))
    modules = [model.layer1[0].attn.spsa, model.layer2[0].attn.spsa, model.layer3[0].attn.spsa]
    wanted = [SPSA(16, reverse=False), SPSA(32, similarity="cosine"), SPSA(64)]
    for module, reference, channels in zip(modules, wanted, (16, 32, 64), strict=True):
        inp = torch.randn(2, channels, 6, 6, generator=torch.Generator().manual_seed(channels))
        with torch.no_grad():
            torch.testing.assert_close(module(inp.clone()), reference(inp.clone()))
    with torch.no_grad():  # alpha 1: x * sigmoid(r) + x * (1 - sigmoid(r)) == x
        both = model.layer1[0].attn.spsa(x.clone()) + SPSA(16)(x.clone())
    torch.testing.assert_close(both, x)
