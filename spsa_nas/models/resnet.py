"""ResNet-18/34/50/101/152 and ResNeXt-50 32x4d with per-stage attention inside the blocks.

Attention placement: in BasicBlock and Bottleneck the block's attention (channel attention and/or
SPSA, see `BlockAttention`) runs on the residual branch after its last BN (bn2 / bn3) and before
the residual addition and the final ReLU — where SE, ECA, CBAM and FcaNet put theirs and where
the SPSA paper puts SPSA. Its modules live under `<layer>.<block>.attn` (e.g.
`layer3.1.attn.channel.fc1.weight`).

Module names, shapes and initialisation are torchvision's (kaiming-normal fan-out convolutions,
BN weight 1 / bias 0, no zero-init of the last BN), so that with the ImageNet stem, width 1 and
no attention the state_dict has exactly torchvision's keys and its weights load unchanged.
`spec.width` scales every stage's planes as `spsa_nas.spec.stage_table` does, and the stem to
make_divisible(64 * width, 8). The CIFAR stem replaces conv1 by a 3x3 stride-1 convolution
(same name) and the max-pool by an identity.

Memory: a block whose attention contains SPSA runs its last BN and the attention, when training,
under `recompute_in_backward` (they run again in the backward pass), so that SPSA's input — the
BN's output, which nothing else keeps — is not kept alive between forward and backward. The
block's `memory_efficient` attribute (default True; `set_memory_efficient`) switches this off.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spsa_nas.models._attn import (
    AttnFactory,
    backbone_modules,
    recompute_in_backward,
    recomputes,
    stage_attention,
)
from spsa_nas.spec import ArchSpec, make_divisible

_BOTTLENECK = {"resnet50", "resnet101", "resnet152", "resnext50_32x4d"}


def _conv3x3(inp: int, out: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; attention after bn2, before the residual addition."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 attn: AttnFactory, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.attn = attn(planes)
        self.memory_efficient = True

    def _tail(self, out: Tensor) -> Tensor:
        return self.attn(self.bn2(out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.relu(self.bn1(self.conv1(x))))
        if not torch.jit.is_scripting():  # noqa: SIM102 (nested: TorchScript then compiles none of it)
            if recomputes(self, self.attn):
                out = recompute_in_backward(self._tail, out, self.bn2, self.attn)
                return self.relu(out + identity)
        return self.relu(self._tail(out) + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 (stride, groups) - 1x1 (torchvision's ResNet v1.5); attention after bn3."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 attn: AttnFactory, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        out = planes * self.expansion
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, out)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.attn = attn(out)
        self.memory_efficient = True

    def _tail(self, out: Tensor) -> Tensor:
        return self.attn(self.bn3(out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv3(self.relu(self.bn2(self.conv2(out))))
        if not torch.jit.is_scripting():  # noqa: SIM102 (nested: TorchScript then compiles none of it)
            if recomputes(self, self.attn):
                out = recompute_in_backward(self._tail, out, self.bn3, self.attn)
                return self.relu(out + identity)
        return self.relu(self._tail(out) + identity)


class ResNet(nn.Module):
    """A ResNet/ResNeXt built from an ArchSpec (see the module docstring)."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        if spec.backbone not in _BOTTLENECK | {"resnet18", "resnet34"}:
            raise ValueError(f"{spec.backbone!r} is not a ResNet/ResNeXt backbone")
        block: type[BasicBlock | Bottleneck] = (
            Bottleneck if spec.backbone in _BOTTLENECK else BasicBlock
        )
        groups, base_width = (32, 4) if spec.backbone == "resnext50_32x4d" else (1, 64)
        stem = make_divisible(64 * spec.width, 8)
        if spec.stem == "cifar":
            self.conv1 = nn.Conv2d(spec.in_channels, stem, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(spec.in_channels, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if spec.stem == "cifar" else nn.MaxPool2d(3, stride=2, padding=1)
        )
        inplanes = stem
        for i, info in enumerate(spec.stage_info()):
            planes = info.channels // block.expansion
            attn = stage_attention(spec, i)
            blocks: list[nn.Module] = []
            for j in range(info.blocks):
                stride = info.stride if j == 0 else 1
                downsample = None
                if stride != 1 or inplanes != info.channels:
                    downsample = nn.Sequential(
                        _conv1x1(inplanes, info.channels, stride), nn.BatchNorm2d(info.channels)
                    )
                blocks.append(block(inplanes, planes, stride, downsample, attn, groups, base_width))
                inplanes = info.channels
            self.add_module(info.name, nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, spec.num_classes)

        for m in backbone_modules(self):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))
