"""Tests of spsa_nas.data: splits, digits, synthetic, CIFAR on-disk folders, image folders, escapes."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from spsa_nas.config import DataConfig, TrainConfig
from spsa_nas.data import (
    DataError,
    dataset_in_channels,
    dataset_num_classes,
    load_data,
    split_indices,
    stratified_holdout,
    synthetic_images,
)
from spsa_nas.train import evaluate_accuracy, train_model


def _labels(ds: torch.utils.data.Dataset) -> np.ndarray:
    return np.array([int(ds[i][1]) for i in range(len(ds))])


# ------------------------------------------------------------------------------------------ splits

def test_split_indices_are_disjoint_cover_and_stratified() -> None:
    labels = np.repeat(np.arange(5), [40, 30, 20, 60, 50])
    cfg = DataConfig(val_fraction=0.2, test_fraction=0.25, seed=3)
    train, val, test = split_indices(labels, cfg)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert sorted([*train, *val, *test]) == list(range(len(labels)))
    assert len(test) == round(0.25 * len(labels))
    for cls, count in zip(range(5), [40, 30, 20, 60, 50], strict=True):
        # each class is held out in proportion, to within one sample
        assert abs((labels[test] == cls).sum() - 0.25 * count) <= 1
        assert abs((labels[val] == cls).sum() - 0.2 * 0.75 * count) <= 1


def test_splits_depend_on_the_seed_only() -> None:
    labels = np.arange(300) % 3
    a = split_indices(labels, DataConfig(seed=1))
    b = split_indices(labels, DataConfig(seed=1))
    c = split_indices(labels, DataConfig(seed=2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[2], c[2])


def test_train_subset_thins_train_only_and_deterministically() -> None:
    labels = np.arange(1000) % 10
    full_train, full_val, full_test = split_indices(labels, DataConfig())
    for subset, expected in ((0.25, round(0.25 * len(full_train))), (100, 100)):
        train, val, test = split_indices(labels, DataConfig(train_subset=subset))
        assert len(train) == expected
        assert set(train) <= set(full_train)
        assert np.array_equal(val, full_val) and np.array_equal(test, full_test)
        assert np.bincount(labels[train]).min() >= expected // 10 - 1  # still every class
        again, _, _ = split_indices(labels, DataConfig(train_subset=subset))
        assert np.array_equal(train, again)
    bigger, _, _ = split_indices(labels, DataConfig(train_subset=10**6))
    assert np.array_equal(bigger, full_train)


def test_stratified_holdout_refuses_a_single_sample() -> None:
    with pytest.raises(DataError, match="1 sample"):
        stratified_holdout(np.array([0]), 0.5, 0)


# ------------------------------------------------------------------------------------------ digits

def test_digits_test_split_never_overlaps_train_or_val() -> None:
    from sklearn.datasets import load_digits

    cfg = DataConfig(name="digits", seed=5)
    splits = load_data(cfg, 8, 1)
    bunch = load_digits()
    train, val, test = split_indices(bunch.target, cfg)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (len(train), len(val), len(test))
    assert len(train) + len(val) + len(test) == len(bunch.target) == 1797
    assert not (set(test) & (set(train) | set(val)))
    # at native size the served test images are exactly the held-out digits
    expected = torch.as_tensor(bunch.images[test], dtype=torch.float32) / 16.0
    served = torch.stack([splits.test[i][0][0] for i in range(len(splits.test))])
    assert torch.equal(served, expected)
    assert np.array_equal(_labels(splits.test), bunch.target[test])
    assert splits.num_classes == 10 and splits.in_channels == 1


def test_digits_resized_and_replicated() -> None:
    splits = load_data(DataConfig(name="digits"), 16, 3)
    image, label = splits.train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    everything = torch.stack([splits.val[i][0] for i in range(len(splits.val))])
    assert everything.min() >= 0 and everything.max() <= 1 and everything.max() > 0.5
    assert 0 <= int(label) < 10
    assert splits.in_channels == 3


def test_bad_channels_or_size_are_data_errors() -> None:
    with pytest.raises(DataError, match="in_channels"):
        load_data(DataConfig(name="digits"), 16, 2)
    with pytest.raises(DataError, match="image_size"):
        load_data(DataConfig(name="digits"), 0, 1)


def test_cheap_class_and_channel_counts() -> None:
    assert (dataset_num_classes(DataConfig(name="digits")), dataset_in_channels(DataConfig())) == (10, 1)
    assert dataset_num_classes(DataConfig(name="cifar10", data_root="/nonexistent")) == 10
    assert dataset_num_classes(DataConfig(name="cifar100", data_root="/nonexistent")) == 100
    assert dataset_in_channels(DataConfig(name="cifar100")) == 3
    assert dataset_num_classes(DataConfig(name="synthetic", synthetic_classes=7)) == 7
    assert dataset_in_channels(DataConfig(name="synthetic")) == 3


# --------------------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_in_its_seed() -> None:
    a, la = synthetic_images(DataConfig(name="synthetic", seed=4, synthetic_samples=64))
    b, lb = synthetic_images(DataConfig(name="synthetic", seed=4, synthetic_samples=64))
    c, _ = synthetic_images(DataConfig(name="synthetic", seed=5, synthetic_samples=64))
    assert torch.equal(a, b) and np.array_equal(la, lb)
    assert not torch.equal(a, c)
    assert a.shape == (64, 3, 16, 16) and np.bincount(la).tolist() == [16] * 4


def test_synthetic_is_learnable() -> None:
    cfg = DataConfig(name="synthetic", synthetic_samples=512, synthetic_classes=4, seed=0)
    splits = load_data(cfg, 16, 3)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )
    report = train_model(model, splits.train, splits.val, TrainConfig(epochs=3, batch_size=16, lr=0.1),
                         "cpu")
    top1 = evaluate_accuracy(model, splits.test, "cpu")[1]
    assert top1 is not None and top1 > 0.6, (report.val_curve, top1)  # chance is 0.25


# ------------------------------------------------------------------------------------------- CIFAR

def _write_cifar(root: Path, name: str, per_file: int = 6) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A tiny CIFAR folder in torchvision's 'python version' on-disk format."""
    if name == "cifar10":
        folder, train, test, key, meta = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], \
            ["test_batch"], "labels", ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
        classes = 10
    else:
        folder, train, test, key, meta = "cifar-100-python", ["train"], ["test"], "fine_labels", \
            ("meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
        classes = 100
    rng = np.random.default_rng(0)
    (root / folder).mkdir(parents=True)
    written = {}
    for i, file in enumerate([*train, *test]):
        data = rng.integers(0, 256, (per_file * 2 if name == "cifar100" else per_file, 3072), dtype=np.uint8)
        labels = [(i * 3 + j) % classes for j in range(len(data))]
        entry = {"batch_label": file, "data": data, key: labels}
        with (root / folder / file).open("wb") as handle:
            pickle.dump(entry, handle, protocol=2)
        written[file] = (data, labels)
    with (root / folder / meta[0]).open("wb") as handle:
        pickle.dump(meta[1], handle, protocol=2)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_the_torchvision_layout(tmp_path: Path, name: str) -> None:
    written = _write_cifar(tmp_path / "datasets", name)
    cfg = DataConfig(name=name, data_root=str(tmp_path / "datasets"), val_fraction=0.2)
    splits = load_data(cfg, 32, 3)
    test_file = "test_batch" if name == "cifar10" else "test"
    data, labels = written[test_file]
    assert len(splits.test) == len(data)
    image, label = splits.test[1]
    assert image.shape == (3, 32, 32)
    assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(data[1].reshape(3, 32, 32)))
    assert int(label) == labels[1]
    n_train = sum(len(d) for f, (d, _) in written.items() if f != test_file)
    assert len(splits.train) + len(splits.val) == n_train
    assert len(splits.val) == round(0.2 * n_train)
    assert splits.num_classes == (10 if name == "cifar10" else 100)
    small = load_data(cfg, 16, 1)
    assert small.train[0][0].shape == (1, 16, 16)


def test_cifar_under_a_subpath(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "root" / "cifar", "cifar10")
    splits = load_data(DataConfig(name="cifar10", data_root=str(tmp_path / "root"), path="cifar"), 32, 3)
    assert len(splits.test) == 6


def test_cifar_pickled_by_old_numpy_is_read(tmp_path: Path) -> None:
    # the published files were pickled by Python 2 / numpy 1.x, naming numpy.core.multiarray
    written = _write_cifar(tmp_path, "cifar10")
    for file in written:
        path = tmp_path / "cifar-10-batches-py" / file
        legacy = path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray" in legacy
        path.write_bytes(legacy)
    splits = load_data(DataConfig(name="cifar10", data_root=str(tmp_path)), 32, 3)
    assert int(splits.test[2][1]) == written["test_batch"][1][2]


def test_missing_cifar_says_where_and_how_to_download(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_data(DataConfig(name="cifar10", data_root=str(tmp_path)), 32, 3)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "download: true" in message


def test_corrupt_cifar_file_is_a_data_error(tmp_path: Path) -> None:
    _write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        load_data(DataConfig(name="cifar10", data_root=str(tmp_path)), 32, 3)


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    _write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("wb") as handle:
        pickle.dump({"data": Evil(), "labels": []}, handle, protocol=2)
    with pytest.raises(DataError, match="not allowed"):
        load_data(DataConfig(name="cifar10", data_root=str(tmp_path)), 32, 3)
    assert not marker.exists()


def test_cifar_path_cannot_escape_the_root(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "outside", "cifar10")
    (tmp_path / "root").mkdir()
    with pytest.raises(DataError, match="outside the data root"):
        load_data(DataConfig(name="cifar10", data_root=str(tmp_path / "root"), path="../outside"), 32, 3)


# ------------------------------------------------------------------------------------- imagefolder

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def _write_folder(folder: Path, per_class: int, size: int = 12) -> None:
    for cls, rgb in COLOURS.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shade = tuple(max(0, c - 8 * i) for c in rgb)
            Image.new("RGB", (size, size + 4), shade).save(folder / cls / f"{i}.png")


def test_imagefolder_one_folder_split_by_fractions(tmp_path: Path) -> None:
    _write_folder(tmp_path / "shapes", per_class=10)
    (tmp_path / "shapes" / "red" / "notes.txt").write_text("not an image")
    cfg = DataConfig(name="imagefolder", data_root=str(tmp_path), path="shapes", val_fraction=0.2,
                     test_fraction=0.3)
    assert dataset_num_classes(cfg) == 3 and dataset_in_channels(cfg) == 3
    splits = load_data(cfg, 8, 3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (17, 4, 9)
    image, label = splits.test[0]
    assert image.shape == (3, 8, 8)
    # the colour is the class: blue=0 green=1 red=2 (sorted folder names)
    assert int(image.mean(dim=(1, 2)).argmax()) == [2, 1, 0][int(label)]
    for part in (splits.train, splits.val, splits.test):
        assert set(_labels(part)) == {0, 1, 2}
    assert not set(splits.test.indices) & (set(splits.train.indices) | set(splits.val.indices))
    grey = load_data(cfg, 8, 1)
    assert grey.train[0][0].shape == (1, 8, 8)


def test_imagefolder_with_train_val_test_folders(tmp_path: Path) -> None:
    for part, n in (("train", 6), ("val", 2), ("test", 3)):
        _write_folder(tmp_path / "ds" / part, per_class=n)
    cfg = DataConfig(name="imagefolder", data_root=str(tmp_path), path="ds", train_subset=9)
    splits = load_data(cfg, 12, 3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 6, 9)
    assert splits.num_classes == 3


def test_imagefolder_val_with_other_classes_is_an_error(tmp_path: Path) -> None:
    _write_folder(tmp_path / "ds" / "train", per_class=4)
    _write_folder(tmp_path / "ds" / "val", per_class=2)
    (tmp_path / "ds" / "val" / "purple").mkdir()
    with pytest.raises(DataError, match="purple"):
        load_data(DataConfig(name="imagefolder", data_root=str(tmp_path), path="ds"), 8, 3)


def test_imagefolder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        dataset_num_classes(DataConfig(name="imagefolder", data_root=str(tmp_path), path="nope"))
    with pytest.raises(DataError, match="path"):
        load_data(DataConfig(name="imagefolder", data_root=str(tmp_path)), 8, 3)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no valid file"):
        load_data(DataConfig(name="imagefolder", data_root=str(tmp_path), path="empty"), 8, 3)


def test_imagefolder_absolute_path_inside_the_root_is_fine(tmp_path: Path) -> None:
    _write_folder(tmp_path / "ds", per_class=5)
    cfg = DataConfig(name="imagefolder", data_root=str(tmp_path), path=str(tmp_path / "ds"))
    assert load_data(cfg, 8, 3).num_classes == 3


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink_root", "symlink_class", "symlink_file"])
def test_imagefolder_cannot_escape_the_data_root(tmp_path: Path, how: str) -> None:
    outside, root = tmp_path / "outside", tmp_path / "root"
    _write_folder(outside, per_class=5)
    _write_folder(root / "ds", per_class=5)
    path = "ds"
    if how == "dotdot":
        path = "../outside"
    elif how == "absolute":
        path = str(outside)
    elif how == "symlink_root":
        (root / "link").symlink_to(outside, target_is_directory=True)
        path = "link"
    elif how == "symlink_class":
        (root / "ds" / "yellow").symlink_to(outside / "red", target_is_directory=True)
    else:
        (root / "ds" / "red" / "stolen.png").symlink_to(outside / "red" / "0.png")
    cfg = DataConfig(name="imagefolder", data_root=str(root), path=path)
    with pytest.raises(DataError, match="outside the data root"):
        load_data(cfg, 8, 3)
