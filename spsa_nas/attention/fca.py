"""FcaNet's multi-spectral channel attention (Qin et al.): DCT pooling at 16 frequencies -> FC -> sigmoid."""

from __future__ import annotations

import math

import torch
from torch import nn

from spsa_nas.attention._common import check_channels, check_input, reduced_channels

#: FcaNet's `top16` frequency selection on a 7×7 DCT grid (cfzd/FcaNet model/layer.py), as
#: (u, v) = (vertical, horizontal) frequency indices. Data, in FcaNet's order.
TOP16_FREQUENCIES: tuple[tuple[int, int], ...] = tuple(zip(
    (0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2),
    (0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2),
    strict=True,
))


def _dct_1d(pos: int, freq: int, size: int) -> float:
    """The orthonormal DCT-II basis function `freq` at position `pos` of `size`."""
    value = math.cos(math.pi * freq * (pos + 0.5) / size) / math.sqrt(size)
    return value if freq == 0 else value * math.sqrt(2)


def channel_groups(channels: int, groups: int) -> list[int]:
    """Sizes of `groups` contiguous channel groups: FcaNet's C/16 each when 16 divides C; otherwise
    the first C mod 16 groups get one channel more (and with C < 16 only the first C frequencies
    are used)."""
    base, extra = divmod(channels, groups)
    return [base + (1 if i < extra else 0) for i in range(groups)]


def dct_filters(channels: int, dct_size: int) -> torch.Tensor:
    """(channels, dct_size, dct_size): channel group i pooled with the 2-D DCT basis of frequency i."""
    scale = dct_size // 7  # FcaNet: a frequency on the 7×7 grid maps to the same one at this size
    basis = torch.zeros(channels, dct_size, dct_size, dtype=torch.float64)
    start = 0
    for (u, v), size in zip(TOP16_FREQUENCIES, channel_groups(channels, len(TOP16_FREQUENCIES)),
                            strict=True):
        rows = torch.tensor([_dct_1d(t, u * scale, dct_size) for t in range(dct_size)], dtype=torch.float64)
        cols = torch.tensor([_dct_1d(t, v * scale, dct_size) for t in range(dct_size)], dtype=torch.float64)
        basis[start:start + size] = torch.outer(rows, cols)
        start += size
    return basis.float()


def _pooling_matrix(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in): adaptive average pooling of a length-`size_in` axis to `size_out`
    (output i averages inputs floor(i·in/out) .. ceil((i+1)·in/out) - 1, as PyTorch's does)."""
    matrix = torch.zeros(size_out, size_in, dtype=like.dtype, device=like.device)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = ((i + 1) * size_in + size_out - 1) // size_out
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def dct_pool(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ over (h, w) of x adaptively average-pooled to weight's (S, S) times weight, per (n, c).

    Pooling is linear and separable, so it is folded into the weight (R^T·weight·C, with R and C
    the pooling matrices of the two axes): one multiply and one sum over x, with no adaptive
    pooling operator (which TorchScript's ONNX exporter refuses when S does not divide the input).
    A leaf of torch.fx tracing (it reads x's shape).
    """
    size = weight.shape[-1]
    h, w = int(x.shape[2]), int(x.shape[3])
    if h != size or w != size:
        rows = _pooling_matrix(h, size, weight)
        cols = _pooling_matrix(w, size, weight)
        weight = torch.matmul(torch.matmul(rows.t(), weight), cols)
    return (x * weight.to(x.dtype)).sum((2, 3))


torch.fx.wrap("dct_pool")


class FCAAttention(nn.Module):
    """FcaNet's MultiSpectralAttentionLayer: top-16 DCT frequencies, bias-free FCs with ratio 1/16.

    The channels are split into 16 contiguous groups (see `channel_groups` for C not divisible by
    16), each pooled with a fixed 2-D DCT basis. `dct_size` is the spatial size the basis is built
    for (FcaNet: 56, 28, 14, 7 for ResNet stages 1-4 at 224²; at least 7, so that the 7×7
    frequency grid fits); input of another size is adaptively average-pooled to it first.
    The basis is a non-persistent buffer: it is rebuilt from (channels, dct_size), so it is not in
    the state_dict and not counted as a parameter; the FCs give 2·C·round(C/16) parameters.
    """

    def __init__(self, channels: int, *, dct_size: int = 7, rd_ratio: float = 1 / 16) -> None:
        super().__init__()
        check_channels("FCAAttention", channels)
        if isinstance(dct_size, bool) or not isinstance(dct_size, int) or dct_size < 7:
            raise ValueError(
                f"FCAAttention: dct_size must be an int >= 7 (FcaNet's 7×7 frequency grid), got {dct_size!r}"
            )
        self.channels = channels
        self.dct_size = dct_size
        self.register_buffer("dct_weight", dct_filters(channels, dct_size), persistent=False)
        hidden = reduced_channels("FCAAttention", channels, rd_ratio)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_input("FCAAttention", x, self.channels)
        w = dct_pool(x, self.dct_weight)
        w = torch.sigmoid(self.fc2(self.act(self.fc1(w))))
        return x * w[:, :, None, None]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dct_size={self.dct_size}"
