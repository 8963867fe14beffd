"""Squeeze-and-Excitation (Hu et al.): GAP -> FC -> ReLU -> FC -> sigmoid -> scale, FCs without bias."""

from __future__ import annotations

import torch
from torch import nn

from spsa_nas.attention._common import check_channels, check_input, reduced_channels


class SEAttention(nn.Module):
    """SE block with bias-free FCs and a hidden width of round(channels * rd_ratio) (default C/16).

    This is the configuration the SE paper's parameter formula and the SPSA paper's Table 1 count:
    2·C²/16 parameters per block. With one SE after the last BN of every bottleneck, ResNet-50 /
    101 / 152 gain exactly 2,514,944 / 4,743,168 / 6,578,176 parameters (the paper's +2.51M /
    +4.74M / +6.58M); with FC biases they would gain C/16 + C more per block.
    """

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 16) -> None:
        super().__init__()
        check_channels("SEAttention", channels)
        self.channels = channels
        hidden = reduced_channels("SEAttention", channels, rd_ratio)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_input("SEAttention", x, self.channels)
        w = x.mean((2, 3))
        w = torch.sigmoid(self.fc2(self.act(self.fc1(w))))
        return x * w[:, :, None, None]
