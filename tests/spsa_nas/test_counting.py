"""count_params, count_flops (fvcore's MAC convention) and spsa_cost."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from spsa_nas.counting import count_flops, count_params, spsa_cost
from spsa_nas.models import build_model
from spsa_nas.spec import ArchSpec, StageSpec

PLAIN = {"resnet50": 25_557_032, "resnet101": 44_549_160, "resnet152": 60_192_808}
DELTA = {
    "se": {"resnet50": 2_514_944, "resnet101": 4_743_168, "resnet152": 6_578_176},
    "eca": {"resnet50": 80, "resnet101": 165, "resnet152": 250},
}


def _params(spec: ArchSpec) -> int:
    with torch.device("meta"):  # counting needs shapes only
        return count_params(build_model(spec))


@pytest.mark.parametrize("backbone", list(PLAIN))
def test_parameter_counts_match_the_papers_table(backbone: str) -> None:
    plain = _params(ArchSpec.plain(backbone))
    assert plain == PLAIN[backbone]
    for attn, deltas in DELTA.items():
        hybrid = _params(ArchSpec.uniform(backbone, StageSpec(channel_attn=attn)))
        assert hybrid - plain == deltas[backbone], attn
    spsa = _params(ArchSpec.uniform(backbone, StageSpec(spsa=True, spsa_heads=8, spsa_alpha=2.0)))
    assert spsa == plain


def test_count_params_includes_frozen_parameters_but_not_buffers() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model[0].weight.requires_grad_(False)
    assert count_params(model) == 4 * 3 + 3 + 3 + 3


def test_resnet50_flops_are_the_papers_4_11g() -> None:
    flops = count_flops(torchvision.models.resnet50(weights=None), (1, 3, 224, 224))
    assert round(flops / 1e9, 2) == 4.11
    assert flops == 4_111_512_576  # fvcore's figure for torchvision ResNet-50


def test_flops_of_our_plain_backbones_equal_torchvisions() -> None:
    for backbone in ("resnet50", "mobilenet_v2", "shufflenet_v2_x1_0"):
        ours = count_flops(build_model(ArchSpec.plain(backbone)), (1, 3, 32, 32))
        theirs = count_flops(getattr(torchvision.models, backbone)(weights=None), (1, 3, 32, 32))
        assert ours == theirs, backbone


def test_flop_rules_on_a_hand_counted_model() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8 * 3 * 9 * 64 per image; the bias is free
        nn.BatchNorm2d(8),  # 2 per element: 2 * 8 * 64
        nn.ReLU(),  # element-wise: 0
        nn.Conv2d(8, 8, 3, padding=1, groups=4),  # 8 * 2 * 9 * 64
        nn.BatchNorm2d(8, affine=False),  # 1 per element: 8 * 64
        nn.MaxPool2d(2),  # 0
        nn.GroupNorm(2, 8),  # 5 per element: 5 * 8 * 16
        nn.AdaptiveAvgPool2d(1),  # 1 per input element: 8 * 16
        nn.Flatten(),
        nn.Linear(8, 10),  # 8 * 10
    )
    per_image = (8 * 3 * 9 * 64 + 2 * 8 * 64 + 8 * 2 * 9 * 64 + 8 * 64 + 5 * 8 * 16 + 8 * 16
                 + 8 * 10)
    model.train()
    assert count_flops(model, (3, 3, 8, 8)) == 3 * per_image
    assert model.training  # restored


def test_functional_convolutions_count_too() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 2, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.conv2d(x, self.weight, padding=1) @ torch.randn(5, 7)

    # conv: 4 * 2 * 9 * 25 per image; matmul (1, 4, 5, 5) @ (5, 7): 4 * 5 * 5 * 7
    assert count_flops(Functional(), (1, 2, 5, 5)) == 4 * 2 * 9 * 25 + 4 * 5 * 5 * 7


def test_bad_input_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        count_flops(nn.Linear(2, 2), (0, 2))


def test_spsa_is_free_in_macs_but_its_memory_passes_are_reported() -> None:
    spec = ArchSpec.uniform("resnet50", StageSpec(spsa=True), stem="cifar", width=0.25, input_size=32)
    model = build_model(spec)
    plain = build_model(ArchSpec.plain("resnet50", stem="cifar", width=0.25, input_size=32))
    shape = (2, 3, 32, 32)
    assert count_flops(model, shape) == count_flops(plain, shape)

    cost = spsa_cost(model, shape)
    blocks = [(info, size) for info, size in zip(spec.stage_info(), spec.feature_sizes(), strict=True)]
    expected_elements = sum(2 * info.channels * size * size * info.blocks for info, size in blocks)
    assert cost["modules"] == cost["calls"] == 16
    assert cost["elements"] == expected_elements
    assert cost["bytes_in"] == 4 * expected_elements
    # at least one read of the input and one write of the output; the fast path needs few more
    assert cost["bytes_read"] >= cost["bytes_in"] and cost["bytes_written"] >= cost["bytes_in"]
    assert cost["passes"] >= 2.0
    assert cost["per_module"][0]["shape"] == [2, spec.stage_info()[0].channels, 32, 32]
    assert spsa_cost(plain, shape)["modules"] == 0


def test_reference_spsa_moves_more_memory_than_the_fast_one() -> None:
    spec = ArchSpec.uniform("resnet18", StageSpec(spsa=True), stem="cifar", width=0.5, input_size=16)
    model = build_model(spec)
    fast = spsa_cost(model, (2, 3, 16, 16))
    for module in model.modules():
        if hasattr(module, "impl"):
            module.impl = "reference"
    reference = spsa_cost(model, (2, 3, 16, 16))
    assert reference["elements"] == fast["elements"]
    assert reference["passes"] > fast["passes"]


def _nl_params(c: int) -> int:
    inter = c // 2  # θ, φ, g: 1x1 convs C -> C/2 with bias; W: C/2 -> C without; BN: 2C
    return 3 * (c * inter + inter) + inter * c + 2 * c


def _gc_params(c: int) -> int:
    h = max(1, round(c / 16))  # context conv C -> 1 (+ bias); C -> h conv; LayerNorm(h); h -> C conv
    return (c + 1) + (c * h + h) + 2 * h + (h * c + c)


def _nl_macs(c: int, size: int, batch: int) -> int:
    inter, hw, pooled = c // 2, size * size, math.ceil(size / 2) ** 2  # keys and values pooled 2x2
    convs = c * inter * hw + 2 * c * inter * pooled + inter * c * hw  # θ; φ and g; W
    affinity = 2 * hw * pooled * inter  # θᵀφ, then the product with g
    return batch * (convs + affinity + 2 * c * hw)  # + the eval BN, 2 per element


def _gc_macs(c: int, size: int, batch: int) -> int:
    h, hw = max(1, round(c / 16)), size * size
    # context conv; the softmax-weighted sum (C x HW by HW x 1); C -> h; LayerNorm (5 per element); h -> C
    return batch * (c * hw + c * hw + c * h + 5 * h + h * c)


def test_non_local_and_gc_blocks_in_a_model_are_counted_by_hand() -> None:
    stages = [StageSpec(spatial_attn="nonlocal"), StageSpec(spatial_attn="gc"),
              StageSpec(spatial_attn="nonlocal", channel_attn="eca"), StageSpec(spatial_attn="gc")]
    spec = ArchSpec(backbone="resnet18", stages=stages, stem="cifar", width=0.25, input_size=16)
    base = ArchSpec(backbone="resnet18", stem="cifar", width=0.25, input_size=16,
                    stages=[StageSpec(), StageSpec(), StageSpec(channel_attn="eca"), StageSpec()])
    shape = (2, 3, 16, 16)
    channels = [info.channels for info in spec.stage_info()]
    sizes = spec.feature_sizes()
    assert channels == [16, 32, 64, 128] and sizes == (16, 8, 4, 2)
    blocks = 2  # per stage of resnet18
    params = blocks * (_nl_params(16) + _gc_params(32) + _nl_params(64) + _gc_params(128))
    assert params == 2 * (568 + 199 + 8_416 + 2_329)
    assert _params(spec) - _params(base) == params
    macs = blocks * (_nl_macs(16, 16, 2) + _gc_macs(32, 8, 2) + _nl_macs(64, 4, 2) + _gc_macs(128, 2, 2))
    model, plain = build_model(spec), build_model(base)
    assert count_flops(model, shape) - count_flops(plain, shape) == macs


def test_spsa_switches_change_no_count() -> None:
    base = ArchSpec.uniform("resnet18", StageSpec(spsa=True), stem="cifar", width=0.25, input_size=16)
    shape = (1, 3, 16, 16)
    reference = count_flops(build_model(base), shape)
    for stage in (StageSpec(spsa=True, spsa_reverse=False), StageSpec(spsa=True, spsa_similarity="cosine")):
        spec = ArchSpec.uniform("resnet18", stage, stem="cifar", width=0.25, input_size=16)
        assert _params(spec) == _params(base)
        assert count_flops(build_model(spec), shape) == reference
        assert spsa_cost(build_model(spec), shape)["modules"] == 8  # one per block
