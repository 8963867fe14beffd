"""The CIFAR-10/100 datasets, read from torchvision's on-disk 'python version' batches."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spsa_nas.config import DataConfig
from spsa_nas.data.errors import DataError
from spsa_nas.data.images import ImageTensors
from spsa_nas.data.paths import data_root, resolve_under
from spsa_nas.data.splits import Splits, split_indices

#: The class count of each CIFAR dataset; their images are RGB (3 channels).
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}

# The torchvision on-disk layout of the CIFAR "python version" archives.
_CIFAR_FILES = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "labels_key": "labels",
        "title": "CIFAR-10",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "labels_key": "fine_labels",
        "title": "CIFAR-100",
    },
}
# The only globals a CIFAR pickle may reference: numpy arrays and their dtypes.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches, refusing any global but numpy arrays (a pickle can run code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch file")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, labels_key: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as handle:
            entry = _CifarUnpickler(handle, encoding="latin1").load()
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[labels_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{name}: cannot read {path}: {exc}; the file is not a CIFAR batch of the "
                        "torchvision 'python version' layout") from exc
    if len(labels) != len(data):
        raise DataError(f"{name}: {path} holds {len(data)} images but {len(labels)} labels")
    return data, labels


def _cifar_folder(cfg: DataConfig) -> Path:
    layout = _CIFAR_FILES[cfg.name]
    root = resolve_under(data_root(cfg), cfg.path, cfg.name)
    folder = root / str(layout["folder"])
    expected = [*layout["train"], *layout["test"]]
    missing = [f for f in expected if not (folder / f).is_file()]
    if missing and cfg.download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
        try:
            cls(root=str(root), train=True, download=True)
        except Exception as exc:  # network, disk, checksum: all mean "could not fetch"
            raise DataError(f"{cfg.name}: download into {root} failed: {exc}") from exc
        missing = [f for f in expected if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{cfg.name}: {layout['title']} not found: looked in {folder} for {', '.join(missing)}. "
            "Set `download: true` in the dataset config (or pass the CLI's --download flag) to "
            "fetch it, or extract torchvision's 'python version' archive there"
        )
    return folder


def load_cifar(cfg: DataConfig, image_size: int, in_channels: int) -> Splits:
    """The splits of CIFAR-10 or CIFAR-100 (`cfg.name`): train/val from the training batches, the
    test batch as the test split; downloaded first when missing and `cfg.download` is set."""
    layout = _CIFAR_FILES[cfg.name]
    folder = _cifar_folder(cfg)
    key = str(layout["labels_key"])
    num_classes = CIFAR_CLASSES[cfg.name]

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_read_cifar_batch(folder / f, key, cfg.name) for f in files]
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"{cfg.name}: labels in {folder} outside 0..{num_classes - 1}")
        return data, labels

    train_x, train_y = read(list(layout["train"]))
    test_x, test_y = read(list(layout["test"]))
    train, val, _ = split_indices(train_y, cfg, with_test=False)

    def part(x: np.ndarray, y: np.ndarray, idx: np.ndarray | None) -> ImageTensors:
        if idx is not None:
            x, y = x[idx], y[idx]
        return ImageTensors(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y),
                            image_size, in_channels, cfg.name)

    return Splits(part(train_x, train_y, train), part(train_x, train_y, val),
                  part(test_x, test_y, None), num_classes, in_channels)
