"""Tests of the channel attentions and their factory: registry, shapes, parameter counts, timm parity."""

from __future__ import annotations

import pytest
import torch
from timm.layers import EcaModule, SEModule
from timm.layers.cbam import CbamModule

from spsa_nas.attention import (
    ATTENTIONS,
    SPSA,
    CBAMAttention,
    ECAAttention,
    FCAAttention,
    SEAttention,
    SimAMAttention,
    create_attention,
)
from spsa_nas.attention.fca import TOP16_FREQUENCIES, channel_groups, dct_filters
from spsa_nas.spec import CHANNEL_ATTENTIONS, stage_table


def test_registry_matches_spec() -> None:
    assert tuple(ATTENTIONS) == CHANNEL_ATTENTIONS


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown channel attention 'sk'") as err:
        create_attention("sk", 64)
    for name in CHANNEL_ATTENTIONS:
        assert name in str(err.value)


def test_unknown_option_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"'se'.*kernel_size"):
        create_attention("se", 64, kernel_size=3)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("eca", {"kernel_size": 4}, "odd"),
        ("fca", {"dct_size": 4}, "dct_size"),
        ("se", {"rd_ratio": 0.0}, "rd_ratio"),
        ("cbam", {"spatial_kernel_size": 6}, "spatial_kernel_size"),
        ("none", {}, "channels"),
    ],
)
def test_bad_options(name: str, options: dict[str, object], message: str) -> None:
    channels = 0 if name == "none" else 64
    with pytest.raises(ValueError, match=message):
        create_attention(name, channels, **options)


def test_wrong_input_channels_named() -> None:
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 32, H, W\)"):
        create_attention("se", 32)(torch.randn(1, 16, 4, 4))


OPTIONS = {"eca": {"kernel_size": 5}, "fca": {"dct_size": 7}}


@pytest.mark.parametrize("name", CHANNEL_ATTENTIONS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_shape_grad_no_nan(name: str, channels_last: bool) -> None:
    torch.manual_seed(0)
    module = create_attention(name, 48, **OPTIONS.get(name, {}))
    x = torch.randn(3, 48, 9, 11)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = module(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for p in module.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    expected = module(x.detach().contiguous())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _resnet_extra_params(backbone: str, name: str) -> int:
    kernels = (3, 5, 5, 7)  # ECANet's released ResNet-50 checkpoint, stage by stage
    total = 0
    for i, stage in enumerate(stage_table(backbone)):
        options = {"kernel_size": kernels[i]} if name == "eca" else {}
        module = create_attention(name, stage.channels, **options)
        total += stage.blocks * sum(p.numel() for p in module.parameters())
    return total


@pytest.mark.parametrize(
    ("backbone", "se", "eca"),
    [("resnet50", 2_514_944, 80), ("resnet101", 4_743_168, 165), ("resnet152", 6_578_176, 250)],
)
def test_paper_table1_parameter_counts(backbone: str, se: int, eca: int) -> None:
    assert _resnet_extra_params(backbone, "se") == se
    assert _resnet_extra_params(backbone, "eca") == eca
    assert round(se / 1e6, 2) == {"resnet50": 2.51, "resnet101": 4.74, "resnet152": 6.58}[backbone]
    assert _resnet_extra_params(backbone, "simam") == 0
    assert _resnet_extra_params(backbone, "none") == 0
    assert sum(p.numel() for p in SPSA(2048, heads=8).parameters()) == 0


def _conv1x1(weight: torch.Tensor) -> torch.Tensor:
    return weight[:, :, None, None].clone()


def test_se_equals_timm() -> None:
    torch.manual_seed(1)
    ours = SEAttention(64)
    theirs = SEModule(64, rd_channels=4, bias=False)
    theirs.load_state_dict({"fc1.weight": _conv1x1(ours.fc1.weight), "fc2.weight": _conv1x1(ours.fc2.weight)})
    x = torch.randn(2, 64, 7, 5)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
def test_eca_equals_timm(kernel_size: int) -> None:
    torch.manual_seed(2)
    ours = ECAAttention(40, kernel_size=kernel_size)
    theirs = EcaModule(channels=None, kernel_size=kernel_size)
    theirs.load_state_dict({"conv.weight": ours.conv.weight.detach().clone()})
    x = torch.randn(2, 40, 6, 6)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("train", [False, True])
def test_cbam_equals_timm(train: bool) -> None:
    torch.manual_seed(3)
    ours = CBAMAttention(64)
    with torch.no_grad():
        ours.spatial_bn.weight.fill_(1.3)
        ours.spatial_bn.bias.fill_(-0.2)
        ours.spatial_bn.running_mean.fill_(0.1)
        ours.spatial_bn.running_var.fill_(2.0)
    theirs = CbamModule(64, rd_ratio=1 / 16, rd_divisor=1, mlp_bias=True)
    bn = ours.spatial_bn
    theirs.load_state_dict({
        "channel.fc1.weight": _conv1x1(ours.fc1.weight),
        "channel.fc1.bias": ours.fc1.bias.detach().clone(),
        "channel.fc2.weight": _conv1x1(ours.fc2.weight),
        "channel.fc2.bias": ours.fc2.bias.detach().clone(),
        # ours pools [max, mean] (Jongchan/attention-module), timm [mean, max]
        "spatial.conv.conv.weight": ours.spatial_conv.weight.detach().flip(1).clone(),
        "spatial.conv.bn.weight": bn.weight.detach().clone(),
        "spatial.conv.bn.bias": bn.bias.detach().clone(),
        "spatial.conv.bn.running_mean": bn.running_mean.clone(),
        "spatial.conv.bn.running_var": bn.running_var.clone(),
        "spatial.conv.bn.num_batches_tracked": bn.num_batches_tracked.clone(),
    })
    ours.train(train)
    theirs.train(train)
    x = torch.randn(4, 64, 9, 9)
    torch.testing.assert_close(ours(x), theirs(x))


def test_fca_dct_basis() -> None:
    assert len(TOP16_FREQUENCIES) == 16 and TOP16_FREQUENCIES[:3] == ((0, 0), (0, 1), (6, 0))
    basis = dct_filters(32, 14).double()
    assert basis.shape == (32, 14, 14)
    # group 0 is the DC component: constant 1/14 (orthonormal DCT); groups are pairs of channels
    torch.testing.assert_close(basis[0], torch.full((14, 14), 1 / 14, dtype=torch.float64))
    torch.testing.assert_close(basis[0], basis[1])
    # distinct frequencies are orthogonal, each basis has unit norm
    flat = basis[::2].reshape(16, -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)
    # (6, 0) on the 7×7 grid is (12, 0) at 14×14: cos(pi·12·(t+0.5)/14) along the rows
    t = torch.arange(14, dtype=torch.float64)
    row = torch.cos(torch.pi * 12 * (t + 0.5) / 14) * (2 / 14) ** 0.5
    torch.testing.assert_close(basis[4], torch.outer(row, torch.full((14,), 14**-0.5, dtype=torch.float64)))


def test_fca_pools_with_dct_and_adapts_size() -> None:
    torch.manual_seed(4)
    module = FCAAttention(32, dct_size=7)
    assert "dct_weight" not in module.state_dict()
    x = torch.randn(2, 32, 7, 7)
    pooled = (x * module.dct_weight).sum((2, 3))
    expected = x * torch.sigmoid(module.fc2(torch.relu(module.fc1(pooled))))[:, :, None, None]
    torch.testing.assert_close(module(x), expected)
    big = torch.randn(2, 32, 14, 14)
    small = torch.nn.functional.adaptive_avg_pool2d(big, 7)
    gate_big = module(big) / big
    gate_small = module(small) / small
    torch.testing.assert_close(gate_big[:, :, :1, :1], gate_small[:, :, :1, :1], atol=1e-5, rtol=1e-4)


def test_fca_channel_groups_handle_remainders() -> None:
    assert channel_groups(64, 16) == [4] * 16
    assert channel_groups(24, 16) == [2] * 8 + [1] * 8
    assert channel_groups(8, 16) == [1] * 8 + [0] * 8
    out = FCAAttention(24, dct_size=7)(torch.randn(1, 24, 7, 7))
    assert out.shape == (1, 24, 7, 7)


def test_simam_formula() -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    mu = x.mean((2, 3), keepdim=True)
    d = (x - mu) ** 2
    var = d.sum((2, 3), keepdim=True) / (5 * 4 - 1)
    expected = x * torch.sigmoid(d / (4 * (var + 1e-4)) + 0.5)
    torch.testing.assert_close(SimAMAttention(8)(x), expected)
    one = SimAMAttention(8)(x[:, :, :1, :1])
    assert torch.isfinite(one).all()
