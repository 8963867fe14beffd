"""The global-context block (Cao et al., GCNet, 2019): one softmax-pooled context vector per sample,
transformed by a bottleneck and added to every position; the light spatial baseline of SPSA's Table 2."""

from __future__ import annotations

import torch
from torch import nn

from spsa_nas.attention._common import check_channels, reduced_channels


class GCBlock(nn.Module):
    """z = x + T(Σ_j softmax_j(w_k · x_j) x_j), T = 1x1 conv → LayerNorm → ReLU → 1x1 conv, with a
    hidden width of round(C · `rd_ratio`) (GCNet's r16 is 1/16, its r4 1/4).

    Context modelling is a 1x1 convolution to one logit per position and a softmax over positions
    (linear in HW, like SPSA, but with parameters); fusion is by addition, as in the paper's best
    variant. The last convolution starts at zero: a new block is the identity. No Python branch
    on the input, so it traces, scripts and exports.
    """

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 16) -> None:
        super().__init__()
        check_channels("GCBlock", channels)
        self.channels = channels
        hidden = reduced_channels("GCBlock", channels, rd_ratio)
        self.context = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        last = self.transform[-1]
        assert isinstance(last, nn.Conv2d)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.context(x).flatten(2), dim=-1)  # (N, 1, HW)
        context = torch.bmm(x.flatten(2), weights.transpose(1, 2)).unsqueeze(-1)  # (N, C, 1, 1)
        return x + self.transform(context)
