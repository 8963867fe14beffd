"""SimAM (Yang et al., ICML 2021): a parameter-free attention from an energy function per neuron."""

from __future__ import annotations

import torch
from torch import nn

from spsa_nas.attention._common import check_channels, check_input


def spread_divisor(x: torch.Tensor) -> int:
    """H·W − 1, at least 1 (SimAM's variance divisor); a leaf of torch.fx tracing."""
    return max(x.shape[2] * x.shape[3] - 1, 1)


torch.fx.wrap("spread_divisor")


class SimAMAttention(nn.Module):
    """out = x · sigmoid(d / (4 (σ² + λ)) + 0.5), d = (x − μ)², σ² = Σd / (HW − 1), per channel.

    No parameters. ZjjConan/SimAM's formula with λ = 1e-4; at a 1×1 feature map HW − 1 = 0, so
    the divisor is clamped to 1 (d is 0 there, and the gate is sigmoid(0.5) instead of NaN).
    """

    def __init__(self, channels: int, *, lambda_: float = 1e-4) -> None:
        super().__init__()
        check_channels("SimAMAttention", channels)
        if not lambda_ > 0.0:
            raise ValueError(f"SimAMAttention: lambda_ must be > 0, got {lambda_!r}")
        self.channels = channels
        self.lambda_ = lambda_

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_input("SimAMAttention", x, self.channels)
        n = spread_divisor(x)
        d = (x - x.mean((2, 3), keepdim=True)).square()
        var = d.sum((2, 3), keepdim=True) / n
        return x * torch.sigmoid(d / (4 * (var + self.lambda_)) + 0.5)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, lambda_={self.lambda_}"
