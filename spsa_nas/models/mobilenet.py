"""MobileNetV2 with per-stage attention inside the inverted-residual blocks.

Attention placement: on the block's output after the projection (pw-linear) convolution's BN,
before the residual addition; blocks without a residual (stride 2 or a change of width) carry it
too, on their output. Its modules live under `features.<i>.attn` (e.g.
`features.2.attn.channel.fc1.weight`). A "stage" is one row of MobileNetV2's setting table
(`spsa_nas.spec.MOBILENET_V2_SETTINGS`): 7 stages, 17 blocks. ECA's kernel follows ECA's
adaptive rule k = odd(|log2(C)/2 + 1/2|) of the stage's channels.

Module names, shapes and initialisation are torchvision's (`features.0` stem, `features.1-17`
inverted residuals with a `conv` Sequential, `features.18` the last 1x1 conv, `classifier`
Dropout + Linear). `spec.width` scales channels as torchvision's `width_mult` does
(make_divisible(c * width, 8); last conv make_divisible(1280 * max(1, width), 8)). The CIFAR stem
makes the first convolution stride 1.

Memory: as in `spsa_nas.models.resnet`, a block whose attention contains SPSA runs the projection's
BN and the attention again in the backward pass when training (`memory_efficient`, default True).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from spsa_nas.models._attn import (
    AttnFactory,
    backbone_modules,
    recompute_in_backward,
    recomputes,
    stage_attention,
)
from spsa_nas.spec import MOBILENET_V2_SETTINGS, ArchSpec, make_divisible


class InvertedResidual(nn.Module):
    """Expand (1x1) - depthwise 3x3 - project (1x1 + BN) -> attention -> (+ input)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, attn: AttnFactory) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, kernel_size=1, activation_layer=nn.ReLU6))
        layers += [
            Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden, activation_layer=nn.ReLU6),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.attn = attn(oup)
        self.memory_efficient = True

    def _tail(self, out: Tensor) -> Tensor:
        return self.attn(self.conv[-1](out))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # noqa: SIM102 (nested: TorchScript then compiles none of it)
            if recomputes(self, self.attn):
                out = self._recomputed(x)
                return x + out if self.use_res_connect else out
        out = self.attn(self.conv(x))
        return x + out if self.use_res_connect else out

    def _recomputed(self, x: Tensor) -> Tensor:
        """The block with the projection's BN and the attention recomputed in the backward pass."""
        out = x
        for i, layer in enumerate(self.conv):
            if i == len(self.conv) - 1:  # the projection's BN: recomputed in the backward pass
                break
            out = layer(out)
        return recompute_in_backward(self._tail, out, self.conv[-1], self.attn)


class MobileNetV2(nn.Module):
    """MobileNetV2 built from an ArchSpec (see the module docstring)."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        if spec.backbone != "mobilenet_v2":
            raise ValueError(f"{spec.backbone!r} is not mobilenet_v2")
        inp = make_divisible(32 * spec.width, 8)
        last = make_divisible(1280 * max(1.0, spec.width), 8)
        stem_stride = 1 if spec.stem == "cifar" else 2
        features: list[nn.Module] = [
            Conv2dNormActivation(spec.in_channels, inp, stride=stem_stride, activation_layer=nn.ReLU6)
        ]
        for i, ((t, _, n, s), info) in enumerate(zip(MOBILENET_V2_SETTINGS, spec.stage_info(), strict=True)):
            attn = stage_attention(spec, i)
            for j in range(n):
                features.append(InvertedResidual(inp, info.channels, s if j == 0 else 1, t, attn))
                inp = info.channels
        features.append(Conv2dNormActivation(inp, last, kernel_size=1, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(last, spec.num_classes))

        for m in backbone_modules(self):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
