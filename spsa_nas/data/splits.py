"""A trial's train/val/test splits: the Splits triple and the stratified, seeded index splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset

from spsa_nas.config import DataConfig
from spsa_nas.data.errors import DataError


@dataclass(frozen=True)
class Splits:
    """The three splits of a trial's data. Images are float CHW tensors in [0, 1] on the CPU."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int


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
    train = train[subset_positions(labels[train], cfg)]
    return train, val, test


def subset_positions(labels: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Positions in a training part's `labels` that `cfg.train_subset` keeps (stratified; all if unset)."""
    n = len(labels)
    if cfg.train_subset is None:
        return np.arange(n)
    want = round(cfg.train_subset * n) if cfg.train_subset <= 1 else round(cfg.train_subset)
    want = max(1, want)
    if want >= n:
        return np.arange(n)
    _, held = stratified_holdout(labels, want / n, cfg.seed + 2)
    return held
