"""CBAM (Woo et al.): a channel gate (shared MLP on avg- and max-pooled vectors), then a spatial gate."""

from __future__ import annotations

import torch
from torch import nn

from spsa_nas.attention._common import check_channels, check_input, reduced_channels


class CBAMAttention(nn.Module):
    """CBAM as in Jongchan/attention-module (MODELS/cbam.py), channel gate first, then spatial.

    Channel gate: sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))), the MLP shared and with biases
    (Linear(C, C·rd_ratio) -> ReLU -> Linear(C·rd_ratio, C)). Spatial gate: [max, mean] over the
    channels -> k×k conv (no bias) -> BatchNorm (momentum 0.01, as there) -> sigmoid.
    Parameters per block: 2·C·h + h + C for the MLP (h = round(C·rd_ratio)), 2·k² + 2 spatial.
    """

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 16, spatial_kernel_size: int = 7) -> None:
        super().__init__()
        check_channels("CBAMAttention", channels)
        if isinstance(spatial_kernel_size, bool) or not isinstance(spatial_kernel_size, int) \
                or spatial_kernel_size < 1 or spatial_kernel_size % 2 == 0:
            raise ValueError(
                f"CBAMAttention: spatial_kernel_size must be an odd positive int, got {spatial_kernel_size!r}"
            )
        self.channels = channels
        hidden = reduced_channels("CBAMAttention", channels, rd_ratio)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)
        self.spatial_conv = nn.Conv2d(
            2, 1, spatial_kernel_size, padding=spatial_kernel_size // 2, bias=False
        )
        self.spatial_bn = nn.BatchNorm2d(1, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_input("CBAMAttention", x, self.channels)
        avg = self.fc2(self.act(self.fc1(x.mean((2, 3)))))
        mx = self.fc2(self.act(self.fc1(x.amax((2, 3)))))
        x = x * torch.sigmoid(avg + mx)[:, :, None, None]
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial_bn(self.spatial_conv(pooled)))
