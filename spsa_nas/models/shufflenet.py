"""ShuffleNetV2 x1.0 with per-stage attention inside the shuffle blocks.

Attention placement: on the right branch (`branch2`: 1x1 - depthwise 3x3 - 1x1, each with BN)
at its output, i.e. after its last BN and ReLU, before the concatenation with the left branch and
the channel shuffle (the block's residual-like merge; ShuffleNetV2+ puts SE at the same point).
The attention therefore sees half the stage's channels, `spsa_nas.spec.stage_table(...).channels`.
Its modules live under `stage<k>.<block>.attn` (e.g. `stage2.0.attn.channel.fc1.weight`). ECA's
kernel follows ECA's adaptive rule k = odd(|log2(C)/2 + 1/2|).

Module names, shapes and initialisation are torchvision's (PyTorch's default initialisation, as
torchvision does not re-initialise ShuffleNetV2). `spec.width` scales the stage widths to
make_divisible(c * width, 4); the stem keeps 24 channels and conv5 1024 (2048 from width 2), as
torchvision's x0.5-x2.0 variants do. The CIFAR stem makes conv1 stride 1 and drops the max-pool.

Memory: a block whose attention contains SPSA runs branch2's last BN, its ReLU and the attention
again in the backward pass when training (`memory_efficient`, default True; see
`spsa_nas.models.resnet`), keeping only the last 1x1 convolution's output, which the BN keeps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spsa_nas.models._attn import AttnFactory, recompute_in_backward, recomputes, stage_attention
from spsa_nas.spec import ArchSpec


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of `groups` groups (ShuffleNet's channel shuffle)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _depthwise(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2's unit: split (stride 1) or duplicate (stride 2), branches, concat, shuffle."""

    def __init__(self, inp: int, oup: int, stride: int, attn: AttnFactory) -> None:
        super().__init__()
        branch = oup // 2
        if stride == 1 and inp != 2 * branch:
            raise ValueError(f"stride-1 shuffle block needs inp == oup, got {inp} and {oup}")
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(
                _depthwise(inp, stride),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch, 1, bias=False),
                nn.BatchNorm2d(branch),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
            _depthwise(branch, stride),
            nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
        )
        self.attn = attn(branch)
        self.memory_efficient = True

    def _tail(self, out: Tensor) -> Tensor:
        """branch2's last BN and ReLU, then the attention."""
        return self.attn(self.branch2[7](self.branch2[6](out)))

    def _right(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # noqa: SIM102 (nested: TorchScript then compiles none of it)
            if recomputes(self, self.attn):
                return self._right_recomputed(x)
        return self.attn(self.branch2(x))

    def _right_recomputed(self, x: Tensor) -> Tensor:
        """branch2 and the attention, the tail recomputed in the backward pass (training)."""
        for i, layer in enumerate(self.branch2):
            if i == 6:  # the last BN: from here on, recomputed in the backward pass
                break
            x = layer(x)
        return recompute_in_backward(self._tail, x, self.branch2[6], self.branch2[7], self.attn)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
            out = torch.cat((left, self._right(right)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self._right(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 built from an ArchSpec (see the module docstring)."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        if spec.backbone != "shufflenet_v2_x1_0":
            raise ValueError(f"{spec.backbone!r} is not shufflenet_v2_x1_0")
        stem = 24
        stride = 1 if spec.stem == "cifar" else 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(spec.in_channels, stem, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
        )
        self.maxpool: nn.Module = (
            nn.Identity() if spec.stem == "cifar" else nn.MaxPool2d(3, stride=2, padding=1)
        )
        inp = stem
        for i, info in enumerate(spec.stage_info()):
            oup = 2 * info.channels
            attn = stage_attention(spec, i)
            blocks = [ShuffleBlock(inp if j == 0 else oup, oup, info.stride if j == 0 else 1, attn)
                      for j in range(info.blocks)]
            self.add_module(info.name, nn.Sequential(*blocks))
            inp = oup
        last = 2048 if spec.width >= 2.0 else 1024
        self.conv5 = nn.Sequential(
            nn.Conv2d(inp, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(last, spec.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        return self.fc(self.conv5(x).mean((2, 3)))  # torchvision's pooling (fvcore counts no mean)
