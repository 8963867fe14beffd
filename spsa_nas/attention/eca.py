"""Efficient Channel Attention (Wang et al., ECA-Net): GAP -> Conv1d across channels -> sigmoid."""

from __future__ import annotations

import torch
from torch import nn

from spsa_nas.attention._common import check_channels, check_input


class ECAAttention(nn.Module):
    """ECA with a fixed odd `kernel_size` (k parameters, no bias), as ECANet's code does.

    ECANet's released ResNet-50 checkpoint uses k = 3, 5, 5, 7 for stages 1..4 (not the paper's
    adaptive rule); the model builder passes those. With one ECA after the last BN of every
    bottleneck this adds 3·3 + 4·5 + 6·5 + 3·7 = 80 parameters to ResNet-50, 165 to ResNet-101
    and 250 to ResNet-152 — the SPSA paper's Table 1.
    """

    def __init__(self, channels: int, *, kernel_size: int = 3) -> None:
        super().__init__()
        check_channels("ECAAttention", channels)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
                or kernel_size % 2 == 0:
            raise ValueError(f"ECAAttention: kernel_size must be an odd positive int, got {kernel_size!r}")
        self.channels = channels
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_input("ECAAttention", x, self.channels)
        w = x.mean((2, 3))[:, None, :]  # (N, 1, C): the channels are the 1-D "sequence"
        w = torch.sigmoid(self.conv(w))
        return x * w[:, 0, :, None, None]
