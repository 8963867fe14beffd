"""The `none` channel attention: an identity that takes `channels` like every other attention."""

from __future__ import annotations

import torch
from torch import nn


class NoAttention(nn.Module):
    """Identity with the attention signature (`channels` first); no parameters, no buffers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"NoAttention: channels must be >= 1, got {channels}")
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
