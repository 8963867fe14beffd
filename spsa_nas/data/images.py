"""Image tensors served to a model: resizing, channel adaptation, and splits of an in-memory pool."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from spsa_nas.config import DataConfig
from spsa_nas.data.errors import DataError
from spsa_nas.data.splits import Splits, split_indices


class ImageTensors(Dataset):
    """uint8 images (N, C, H, W) in memory, served as float [0, 1] at `image_size` with `in_channels`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int, in_channels: int,
                 name: str) -> None:
        self.images = images
        self.labels = labels
        self.image_size = image_size
        self.in_channels = in_channels
        self.name = name

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].unsqueeze(0).float().div_(255.0)
        image = adapt_channels(resize(image, self.image_size), self.in_channels, self.name)
        return image[0], self.labels[index]


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float images (N, C, H, W) to size×size (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    shrinking = size < min(images.shape[-2:])
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=shrinking).clamp_(0.0, 1.0)


def adapt_channels(images: torch.Tensor, in_channels: int, name: str) -> torch.Tensor:
    """Replicate grey images to 3 channels, or take the luminance of RGB ones; else DataError."""
    have = images.shape[1]
    if have == in_channels:
        return images
    if have == 1 and in_channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and in_channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    raise DataError(f"{name}: images have {have} channel(s); cannot serve them with {in_channels} "
                    "(supported: the same, 1 -> 3 replicated, 3 -> 1 luminance)")


def tensor_splits(images: torch.Tensor, labels: np.ndarray, cfg: DataConfig, num_classes: int,
                  image_size: int, in_channels: int) -> Splits:
    """Splits of a small pool of float images (N, C, h, w), resized and held as TensorDatasets."""
    images = adapt_channels(resize(images, image_size), in_channels, cfg.name).contiguous()
    targets = torch.as_tensor(labels, dtype=torch.long)
    train, val, test = split_indices(labels, cfg)

    def part(idx: np.ndarray) -> TensorDataset:
        index = torch.as_tensor(idx, dtype=torch.long)
        return TensorDataset(images[index], targets[index])

    return Splits(part(train), part(val), part(test), num_classes, in_channels)
