"""The imagefolder dataset: one folder per class under the data root, optionally train/val/test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from spsa_nas.config import DataConfig
from spsa_nas.data.errors import DataError
from spsa_nas.data.paths import data_root, resolve_under
from spsa_nas.data.splits import Splits, stratified_holdout, subset_positions


def imagefolder_num_classes(cfg: DataConfig) -> int:
    """The number of class folders of the configured image folder, without reading any image."""
    classes, _ = _folder_classes(_imagefolder_layout(cfg)[0], cfg)
    return len(classes)


def _imagefolder_layout(cfg: DataConfig) -> tuple[Path, Path | None, Path | None]:
    """(train dir, val dir or None, test dir or None) of an image folder, checked to exist."""
    if not cfg.path:
        raise DataError("imagefolder: `path` is required (a directory under the data root)")
    root = resolve_under(data_root(cfg), cfg.path, "imagefolder")
    if not root.is_dir():
        raise DataError(f"imagefolder: directory {root} does not exist (path {cfg.path!r} under the "
                        f"data root {data_root(cfg).resolve()})")
    if (root / "train").is_dir():
        base = data_root(cfg)
        train, val, test = (resolve_under(base, str(root / part), "imagefolder")
                            if (root / part).is_dir() else None for part in ("train", "val", "test"))
        return train or root, val, test
    return root, None, None


def _folder_classes(folder: Path, cfg: DataConfig) -> tuple[list[str], dict[str, int]]:
    from torchvision.datasets.folder import find_classes

    try:
        classes, mapping = find_classes(folder)
    except FileNotFoundError as exc:
        raise DataError(f"imagefolder: no class folders in {folder}: {exc}") from exc
    base = data_root(cfg).resolve()
    for cls in classes:
        resolve_under(base, str(folder / cls), f"imagefolder class {cls!r}")
    return classes, mapping


def _image_folder(folder: Path, cfg: DataConfig, classes: list[str], image_size: int,
                  in_channels: int) -> Dataset:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    have, _ = _folder_classes(folder, cfg)
    if have != classes:
        raise DataError(f"imagefolder: {folder} has classes {have}, expected the training classes "
                        f"{classes}")
    base = data_root(cfg).resolve()

    def valid(path: str) -> bool:
        if not has_file_allowed_extension(path, IMG_EXTENSIONS):
            return False
        resolve_under(base, path, "imagefolder file")
        return True

    steps: list[Any] = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if in_channels == 1:
        steps.append(transforms.Grayscale(1))
    steps.append(transforms.ToTensor())
    try:
        return ImageFolder(str(folder), transform=transforms.Compose(steps), is_valid_file=valid)
    except FileNotFoundError as exc:
        raise DataError(f"imagefolder: {exc}") from exc


def load_imagefolder(cfg: DataConfig, image_size: int, in_channels: int) -> Splits:
    """The splits of an image folder: its own val/ and test/ folders where present, else
    stratified parts of the training pool; every file and class must resolve under the data root."""
    train_dir, val_dir, test_dir = _imagefolder_layout(cfg)
    classes, _ = _folder_classes(train_dir, cfg)
    pool = _image_folder(train_dir, cfg, classes, image_size, in_channels)
    labels = np.asarray(pool.targets)  # type: ignore[attr-defined]
    test: Dataset
    if test_dir is not None:
        test = _image_folder(test_dir, cfg, classes, image_size, in_channels)
        rest, held_test = np.arange(len(labels)), np.array([], dtype=int)
    else:
        rest, held_test = stratified_holdout(labels, cfg.test_fraction, cfg.seed)
        test = Subset(pool, held_test.tolist())
    if val_dir is not None:
        val: Dataset = _image_folder(val_dir, cfg, classes, image_size, in_channels)
        train_idx = rest[subset_positions(labels[rest], cfg)]
    else:
        keep, held = stratified_holdout(labels[rest], cfg.val_fraction, cfg.seed + 1)
        val = Subset(pool, rest[held].tolist())
        train_idx = rest[keep][subset_positions(labels[rest[keep]], cfg)]
    return Splits(Subset(pool, train_idx.tolist()), val, test, len(classes), in_channels)
