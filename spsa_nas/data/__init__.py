"""Datasets of a trial (digits, synthetic, CIFAR-10/100, image folders) and their train/val/test splits."""

from __future__ import annotations

from spsa_nas.data.errors import DataError
from spsa_nas.data.images import ImageTensors, adapt_channels, resize
from spsa_nas.data.paths import DEFAULT_DATA_ROOT, data_root, resolve_under
from spsa_nas.data.registry import dataset_in_channels, dataset_num_classes, load_data
from spsa_nas.data.splits import Splits, split_indices, stratified_holdout
from spsa_nas.data.synthetic import synthetic_images

__all__ = [
    "DEFAULT_DATA_ROOT",
    "DataError",
    "ImageTensors",
    "Splits",
    "adapt_channels",
    "data_root",
    "dataset_in_channels",
    "dataset_num_classes",
    "load_data",
    "resize",
    "resolve_under",
    "split_indices",
    "stratified_holdout",
    "synthetic_images",
]
