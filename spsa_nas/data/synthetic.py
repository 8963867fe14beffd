"""The synthetic dataset: coloured sinusoidal gratings generated from the seed."""

from __future__ import annotations

import math

import numpy as np
import torch

from spsa_nas.config import DataConfig
from spsa_nas.data.images import tensor_splits
from spsa_nas.data.splits import Splits


def synthetic_images(cfg: DataConfig) -> tuple[torch.Tensor, np.ndarray]:
    """The synthetic problem: coloured sinusoidal gratings whose orientation (and, past 8 classes,
    frequency) is the class, with random phase, contrast, colour, orientation jitter and pixel
    noise. Returns float images (N, 3, size, size) in [0, 1] and labels; deterministic in the seed.
    """
    rng = np.random.default_rng(cfg.seed)
    n, k, size = cfg.synthetic_samples, cfg.synthetic_classes, cfg.synthetic_size
    orientations = min(k, 8)
    labels = rng.permutation(np.arange(n) % k)
    theta = math.pi * (labels % orientations) / orientations
    theta = theta + rng.uniform(-0.25, 0.25, n) * math.pi / orientations
    cycles = 1.5 + 1.0 * (labels // orientations)  # periods across the image
    freq = 2 * math.pi * cycles / size
    phase = rng.uniform(0, 2 * math.pi, n)
    coords = np.arange(size, dtype=np.float64)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    along = (np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy)
    wave = np.sin(freq[:, None, None] * along + phase[:, None, None])  # (N, S, S)
    contrast = rng.uniform(0.15, 0.35, (n, 1, 1, 1))
    colour = rng.uniform(0.5, 1.0, (n, 3, 1, 1))
    images = 0.5 + contrast * colour * wave[:, None] + rng.normal(0.0, 0.08, (n, 3, size, size))
    return torch.as_tensor(np.clip(images, 0.0, 1.0), dtype=torch.float32), labels


def load_synthetic(cfg: DataConfig, image_size: int, in_channels: int) -> Splits:
    """The splits of the synthetic problem at `image_size` with `in_channels`."""
    images, labels = synthetic_images(cfg)
    return tensor_splits(images, labels, cfg, cfg.synthetic_classes, image_size, in_channels)
