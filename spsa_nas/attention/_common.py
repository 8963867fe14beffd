"""Small helpers shared by the attention modules: argument checks and reduced widths."""

from __future__ import annotations

import torch


def check_channels(name: str, channels: int) -> None:
    """Raise a ValueError naming the module when `channels` is not a positive int."""
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"{name}: channels must be a positive int, got {channels!r}")


def reduced_channels(name: str, channels: int, rd_ratio: float) -> int:
    """Hidden width of a bottleneck MLP: round(channels * rd_ratio), at least 1."""
    if not 0.0 < rd_ratio <= 1.0:
        raise ValueError(f"{name}: rd_ratio must be in (0, 1], got {rd_ratio!r}")
    return max(1, round(channels * rd_ratio))


def check_input(name: str, x: torch.Tensor, channels: int) -> None:
    """Raise a ValueError when `x` is not (N, channels, H, W); a no-op while torch.fx or
    torch.jit.trace traces (there are no values to check, and a check would become control flow)."""
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing():
        return
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(
            f"{name}: expected input of shape (N, {channels}, H, W), got {tuple(x.shape)}"
        )
