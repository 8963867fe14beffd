"""The digits dataset: scikit-learn's 8×8 grey handwritten digits, split from one pool."""

from __future__ import annotations

import numpy as np
import torch

from spsa_nas.config import DataConfig
from spsa_nas.data.images import tensor_splits
from spsa_nas.data.splits import Splits

#: The class count of digits (0-9); its images are grey (1 channel).
DIGITS_CLASSES = 10


def load_digits(cfg: DataConfig, image_size: int, in_channels: int) -> Splits:
    """The splits of scikit-learn's digits at `image_size` with `in_channels`."""
    from sklearn import datasets

    bunch = datasets.load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return tensor_splits(images, np.asarray(bunch.target), cfg, DIGITS_CLASSES, image_size, in_channels)
