"""Datasets of a trial (digits, synthetic, CIFAR-10/100, image folders) and their train/val/test splits."""

from __future__ import annotations

import functools
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from spsa_nas.config import DataConfig

#: Where datasets are looked for when `DataConfig.data_root` is not set (relative to the cwd).
DEFAULT_DATA_ROOT = "data"

# Natural channel count and class count of the fixed datasets (synthetic/imagefolder: from config/disk).
_FIXED = {"digits": (10, 1), "cifar10": (10, 3), "cifar100": (100, 3)}

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


class DataError(ValueError):
    """A dataset that cannot be loaded as configured; the message names the dataset and the path."""


@dataclass(frozen=True)
class Splits:
    """The three splits of a trial's data. Images are float CHW tensors in [0, 1] on the CPU."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int


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


# ----------------------------------------------------------------------------------------- splits

def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of `labels` into (kept, held out), the held-out part ≈ `fraction` of every class.

    Deterministic in `seed`; both parts are sorted. Class quotas use the largest remainder, so the
    held-out size is round(fraction × N) (at least 1, at most N − 1).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        raise DataError(f"cannot split {n} sample(s) into two parts")
    total = min(max(round(fraction * n), 1), n - 1)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (total / n)
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: total - quota.sum()]:
        quota[i] += 1
    rng = np.random.default_rng(seed)
    held = []
    for cls, q in zip(classes, quota, strict=True):
        members = np.flatnonzero(labels == cls)
        held.append(rng.permutation(members)[:q])
    held_idx = np.sort(np.concatenate(held))
    mask = np.ones(n, dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def split_indices(labels: Sequence[int] | np.ndarray, cfg: DataConfig,
                  with_test: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test) into one labelled pool, stratified by class, from `cfg.seed`.

    The test part (`cfg.test_fraction` of the pool) is taken first and never depends on
    `train_subset`; the validation part is `cfg.val_fraction` of what remains; `train_subset` then
    thins the training part. With `with_test=False` the test part is empty (a separate test set).
    """
    labels = np.asarray(labels)
    pool = np.arange(len(labels))
    test = np.array([], dtype=int)
    if with_test:
        keep, held = stratified_holdout(labels, cfg.test_fraction, cfg.seed)
        pool, test = keep, held
    keep, held = stratified_holdout(labels[pool], cfg.val_fraction, cfg.seed + 1)
    train, val = pool[keep], pool[held]
    train = train[_subset_positions(labels[train], cfg)]
    return train, val, test


def _subset_positions(labels: np.ndarray, cfg: DataConfig) -> np.ndarray:
    n = len(labels)
    if cfg.train_subset is None:
        return np.arange(n)
    want = round(cfg.train_subset * n) if cfg.train_subset <= 1 else round(cfg.train_subset)
    want = max(1, want)
    if want >= n:
        return np.arange(n)
    _, held = stratified_holdout(labels, want / n, cfg.seed + 2)
    return held


# ------------------------------------------------------------------------------------- public API

def dataset_num_classes(cfg: DataConfig) -> int:
    """The number of classes of the configured dataset, without loading its images."""
    if cfg.name in _FIXED:
        return _FIXED[cfg.name][0]
    if cfg.name == "synthetic":
        return cfg.synthetic_classes
    classes, _ = _folder_classes(_imagefolder_layout(cfg)[0], cfg)
    return len(classes)


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
    loaders = {
        "digits": _load_digits,
        "synthetic": _load_synthetic,
        "cifar10": _load_cifar,
        "cifar100": _load_cifar,
        "imagefolder": _load_imagefolder,
    }
    if cfg.name not in loaders:
        raise DataError(f"unknown dataset {cfg.name!r}; valid: {', '.join(loaders)}")
    return loaders[cfg.name](cfg, image_size, in_channels)


def _tensor_splits(images: torch.Tensor, labels: np.ndarray, cfg: DataConfig, num_classes: int,
                   image_size: int, in_channels: int) -> Splits:
    """Splits of a small pool of float images (N, C, h, w), resized and held as TensorDatasets."""
    images = adapt_channels(resize(images, image_size), in_channels, cfg.name).contiguous()
    targets = torch.as_tensor(labels, dtype=torch.long)
    train, val, test = split_indices(labels, cfg)

    def part(idx: np.ndarray) -> TensorDataset:
        index = torch.as_tensor(idx, dtype=torch.long)
        return TensorDataset(images[index], targets[index])

    return Splits(part(train), part(val), part(test), num_classes, in_channels)


def _load_digits(cfg: DataConfig, image_size: int, in_channels: int) -> Splits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return _tensor_splits(images, np.asarray(bunch.target), cfg, 10, image_size, in_channels)


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


def _load_synthetic(cfg: DataConfig, image_size: int, in_channels: int) -> Splits:
    images, labels = synthetic_images(cfg)
    return _tensor_splits(images, labels, cfg, cfg.synthetic_classes, image_size, in_channels)


# ------------------------------------------------------------------------------------------- paths

def resolve_under(root: Path, path: str | None, name: str) -> Path:
    """`root/path` with symlinks resolved; DataError when it leaves `root` (.., absolute, links)."""
    base = root.resolve()
    target = (base / path).resolve() if path else base
    if not target.is_relative_to(base):
        raise DataError(f"{name}: path {path!r} resolves to {target}, outside the data root {base}; "
                        "datasets must live under the data root")
    return target


def data_root(cfg: DataConfig) -> Path:
    """The configured data root (default: ./data)."""
    return Path(cfg.data_root if cfg.data_root is not None else DEFAULT_DATA_ROOT).expanduser()


# ------------------------------------------------------------------------------------------- CIFAR

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


def _load_cifar(cfg: DataConfig, image_size: int, in_channels: int) -> Splits:
    layout = _CIFAR_FILES[cfg.name]
    folder = _cifar_folder(cfg)
    key = str(layout["labels_key"])
    num_classes = _FIXED[cfg.name][0]

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


# ------------------------------------------------------------------------------------- imagefolder

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


def _load_imagefolder(cfg: DataConfig, image_size: int, in_channels: int) -> Splits:
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
        train_idx = rest[_subset_positions(labels[rest], cfg)]
    else:
        keep, held = stratified_holdout(labels[rest], cfg.val_fraction, cfg.seed + 1)
        val = Subset(pool, rest[held].tolist())
        train_idx = rest[keep][_subset_positions(labels[rest[keep]], cfg)]
    return Splits(Subset(pool, train_idx.tolist()), val, test, len(classes), in_channels)
