"""The non-local block, embedded-Gaussian version (Wang et al., CVPR 2018): a spatial attention that
relates every position to every other, the heavy baseline SPSA's paper compares with (its Table 2)."""

from __future__ import annotations

import torch
from torch import nn

from spsa_nas.attention._common import check_channels


class NonLocalBlock(nn.Module):
    """z = x + BN(W · softmax(θ(x)ᵀ φ(x)) g(x)), with θ, φ, g 1x1 convolutions to C / `reduction`
    channels and W a 1x1 convolution back to C.

    As in the paper: φ and g are max-pooled 2x2 when `sub_sample` (a quarter of the key positions,
    the cost of the affinity matrix divided by 4); the last BN's scale starts at zero, so a new block
    is the identity and pre-trained backbones are not disturbed. The affinity is (HW)² per sample:
    quadratic in the positions, which is what SPSA (linear, no parameters) is weighed against.
    Shape-generic: no Python branch on the input, so it traces, scripts and exports.
    """

    def __init__(self, channels: int, *, reduction: int = 2, sub_sample: bool = True) -> None:
        super().__init__()
        check_channels("NonLocalBlock", channels)
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"NonLocalBlock: reduction must be a positive int, got {reduction!r}")
        self.channels = channels
        inter = max(1, channels // reduction)
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        # ceil_mode: a 1x1 map (late stages of tiny inputs) pools to 1x1 instead of failing
        self.pool: nn.Module = nn.MaxPool2d(2, ceil_mode=True) if sub_sample else nn.Identity()
        self.out = nn.Conv1d(inter, channels, 1, bias=False)  # W, on the flattened positions
        self.bn = nn.BatchNorm1d(channels)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.theta(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        pooled = self.pool(x)
        key = self.phi(pooled).flatten(2)  # (N, C', HW')
        value = self.g(pooled).flatten(2).transpose(1, 2)  # (N, HW', C')
        affinity = torch.softmax(torch.bmm(query, key), dim=-1)  # (N, HW, HW')
        y = torch.bmm(affinity, value).transpose(1, 2)  # (N, C', HW)
        return x + self.bn(self.out(y)).view_as(x)
