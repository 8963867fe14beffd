"""Datasets by name: their loaders, load_data (cached per process) and their class/channel counts."""

from __future__ import annotations

import functools
from collections.abc import Callable

from spsa_nas.config import DETECTION_DATASETS, DataConfig
from spsa_nas.data.cifar import CIFAR_CLASSES, load_cifar
from spsa_nas.data.digits import DIGITS_CLASSES, load_digits
from spsa_nas.data.errors import DataError
from spsa_nas.data.imagefolder import imagefolder_num_classes, load_imagefolder
from spsa_nas.data.splits import Splits
from spsa_nas.data.synthetic import load_synthetic

#: The loader of each dataset: (cfg, image_size, in_channels) -> Splits.
LOADERS: dict[str, Callable[[DataConfig, int, int], Splits]] = {
    "digits": load_digits,
    "synthetic": load_synthetic,
    "cifar10": load_cifar,
    "cifar100": load_cifar,
    "imagefolder": load_imagefolder,
}

# Natural class count and channel count of the fixed datasets (synthetic/imagefolder: from config/disk).
_FIXED = {"digits": (DIGITS_CLASSES, 1), **{name: (classes, 3) for name, classes in CIFAR_CLASSES.items()}}


def dataset_num_classes(cfg: DataConfig) -> int:
    """The number of classes of the configured dataset, without loading its images."""
    if cfg.name in _FIXED:
        return _FIXED[cfg.name][0]
    if cfg.name == "synthetic":
        return cfg.synthetic_classes
    if cfg.name in DETECTION_DATASETS:  # a detector's classes: the categories + the background
        from spsa_nas.detection.data import detection_num_classes

        return detection_num_classes(cfg)
    return imagefolder_num_classes(cfg)


def dataset_in_channels(cfg: DataConfig) -> int:
    """The natural channel count of the configured dataset (digits: 1, the others: 3)."""
    if cfg.name in _FIXED:
        return _FIXED[cfg.name][1]
    return 3


def load_data(cfg: DataConfig, image_size: int, in_channels: int) -> Splits:
    """The train/val/test splits of `cfg` as float images in [0, 1] of side `image_size`.

    Cached per process (keyed on the frozen config, the size and the channels); the datasets are
    read-only views, so sharing them between trials is safe.
    """
    if image_size < 1:
        raise DataError(f"{cfg.name}: image_size must be positive, got {image_size}")
    if in_channels not in (1, 3):
        raise DataError(f"{cfg.name}: in_channels must be 1 or 3, got {in_channels}")
    return _load_cached(cfg, image_size, in_channels)


@functools.lru_cache(maxsize=4)
def _load_cached(cfg: DataConfig, image_size: int, in_channels: int) -> Splits:
    if cfg.name in DETECTION_DATASETS:
        raise DataError(f"{cfg.name} is detection data (boxes, not class labels): search it with a "
                        "detection space (task: detection), e.g. detection_quick")
    if cfg.name not in LOADERS:
        raise DataError(f"unknown dataset {cfg.name!r}; valid: {', '.join(LOADERS)}")
    return LOADERS[cfg.name](cfg, image_size, in_channels)
