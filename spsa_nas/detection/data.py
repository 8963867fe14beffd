"""COCO-format detection data confined to the data root: the dataset, its splits, the shapes data.

A COCO-format dataset is a folder under the data root with `annotations/instances_<split>.json`
and the images of each split in `<split>/` (split names `train`/`val`, or COCO 2017's
`train2017`/`val2017`). Every image a JSON names must resolve inside its split's folder (no
`..`, no absolute path, no link out); the annotation files must lie in the dataset's folder.

Splits of a trial: the train split's images are divided into the training part and a validation
part (`DataConfig.val_fraction`, seeded), on which the search's mAP is measured each epoch; the
val split, never seen during the search, is the test set whose AP a trial reports. Without a val
split, a test part (`test_fraction`) is carved out of the train split as well.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from spsa_nas.config import DETECTION_DATASETS, DataConfig
from spsa_nas.data.errors import DataError
from spsa_nas.data.paths import data_root, resolve_under
from spsa_nas.detection.shapes import generate_shapes, shapes_dirname

__all__ = ["CocoDetection", "DetectionSplits", "collate", "dataset_folder", "detection_num_classes",
           "load_detection_data", "quiet_coco"]

_SPLIT_NAMES = {"train": ("train", "train2017"), "val": ("val", "val2017")}


def quiet_coco(dataset: dict[str, Any]) -> Any:
    """A pycocotools COCO object of an in-memory COCO dict (without its progress prints)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """Images and targets of a COCO dict: (float image C×H×W in [0, 1], torchvision target).

    The target has `boxes` (x1, y1, x2, y2 floats), `labels` (1..K: the categories in id order),
    `image_id`, and `masks` (N×H×W uint8) when `masks` is set. Crowd annotations and boxes
    without area are left out of the targets (the evaluator's ground truth keeps crowds).
    """

    def __init__(self, coco: dict[str, Any], images_dir: Path, *, masks: bool, in_channels: int = 3,
                 name: str = "coco") -> None:
        self.coco = coco
        self.images_dir = images_dir
        self.masks = masks
        self.in_channels = in_channels
        self.name = name
        self.records = list(coco["images"])
        ordered = sorted(coco["categories"], key=lambda c: c["id"])
        self.label_of = {c["id"]: i + 1 for i, c in enumerate(ordered)}
        self._anns: dict[int, list[dict[str, Any]]] = {r["id"]: [] for r in self.records}
        for ann in coco["annotations"]:
            if ann["image_id"] in self._anns:
                self._anns[ann["image_id"]].append(ann)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from PIL import Image

        record = self.records[index]
        path = resolve_under(self.images_dir, str(record["file_name"]), f"{self.name} image")
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.in_channels == 1 else "RGB")
                pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        except OSError as exc:
            raise DataError(f"{self.name}: image {record['file_name']!r} (id {record['id']}) cannot be "
                            f"read: {exc}") from exc
        image = (pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)).float().div_(255.0)
        height, width = image.shape[-2:]
        anns = [a for a in self._anns[record["id"]]
                if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        target = {"boxes": boxes,
                  "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
                  "image_id": torch.tensor(record["id"])}
        if self.masks:
            from pycocotools import mask as mask_utils

            planes = []
            for ann in anns:
                seg = ann.get("segmentation")
                if isinstance(seg, list):
                    rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
                elif isinstance(seg, dict):
                    compressed = not isinstance(seg.get("counts"), list)
                    rle = seg if compressed else mask_utils.frPyObjects(seg, height, width)
                else:
                    raise DataError(f"{self.name}: annotation {ann.get('id')} of image {record['id']} has no "
                                    "segmentation; Mask R-CNN needs masks")
                planes.append(torch.from_numpy(mask_utils.decode(rle)))
            target["masks"] = (torch.stack(planes) if planes
                               else torch.zeros((0, height, width), dtype=torch.uint8))
        return image, target


def collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[list, list]:
    """A batch of detection samples as (images, targets) lists, the form torchvision's detectors take."""
    return [image for image, _ in batch], [target for _, target in batch]


@dataclass(frozen=True)
class DetectionSplits:
    """A trial's detection data: datasets and the COCO ground truth of the val and test parts."""

    train: CocoDetection
    val: CocoDetection
    test: CocoDetection
    categories: list[dict[str, Any]]  # COCO categories in label order (label i + 1 is categories[i])

    @property
    def num_classes(self) -> int:
        """Classes of a detector for this data: the categories plus the background."""
        return len(self.categories) + 1


def dataset_folder(cfg: DataConfig) -> Path:
    """The dataset's folder under the data root (the shapes data is generated there if absent)."""
    root = data_root(cfg)
    if cfg.name == "shapes":
        name = shapes_dirname(cfg.shapes_images, cfg.shapes_size, cfg.shapes_categories, cfg.seed)
        return generate_shapes(resolve_under(root, name, "shapes"), images=cfg.shapes_images,
                               size=cfg.shapes_size, categories=cfg.shapes_categories, seed=cfg.seed)
    if cfg.name != "coco":
        raise DataError(f"dataset {cfg.name!r} is not a detection dataset; valid: "
                        f"{', '.join(DETECTION_DATASETS)}")
    if not cfg.path:
        raise DataError("coco: set dataset.path to the dataset's folder under the data root")
    folder = resolve_under(root, cfg.path, "coco")
    if not folder.is_dir():
        raise DataError(f"coco: {cfg.path!r} is not a folder under the data root {root.resolve()}")
    return folder


def _split(folder: Path, split: str) -> tuple[dict[str, Any], Path] | None:
    for name in _SPLIT_NAMES[split]:
        ann = resolve_under(folder, f"annotations/instances_{name}.json", f"coco {split} annotations")
        if ann.is_file():
            images = resolve_under(folder, name, f"coco {split} images")
            return _read_json(ann), images
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"coco: {path.name}: not a readable JSON file ({exc})") from exc
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"coco: {path.name}: not a COCO instances file (no list {', '.join(missing)})")
    for i, record in enumerate(data["images"]):
        if not isinstance(record, dict) or not {"id", "file_name"} <= set(record):
            raise DataError(f"coco: {path.name}: images[{i}] needs an id and a file_name")
    return data


def _subset(coco: dict[str, Any], image_ids: set[int]) -> dict[str, Any]:
    return {"images": [r for r in coco["images"] if r["id"] in image_ids],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in image_ids],
            "categories": copy.deepcopy(coco["categories"])}


def detection_num_classes(cfg: DataConfig) -> int:
    """Classes a detector of this dataset has: its categories + the background (reads the JSON only)."""
    if cfg.name == "shapes":
        return cfg.shapes_categories + 1
    found = _split(dataset_folder(cfg), "train")
    if found is None:
        raise DataError(f"coco: {cfg.path!r} has no annotations/instances_train.json (or train2017)")
    return len(found[0]["categories"]) + 1


def load_detection_data(cfg: DataConfig, *, masks: bool, in_channels: int = 3) -> DetectionSplits:
    """The train/val/test parts of a detection dataset (see the module docstring); cached per process."""
    return _load_cached(cfg, masks, in_channels)


@functools.lru_cache(maxsize=4)
def _load_cached(cfg: DataConfig, masks: bool, in_channels: int) -> DetectionSplits:
    folder = dataset_folder(cfg)
    train = _split(folder, "train")
    if train is None:
        raise DataError(f"{cfg.name}: {folder} has no annotations/instances_train.json (or train2017)")
    pool, train_dir = train
    held = _split(folder, "val")
    ids = np.array(sorted(r["id"] for r in pool["images"]))
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(ids))
    if held is None:
        n_test = max(1, round(cfg.test_fraction * len(ids)))
        test_ids, order = set(ids[order[:n_test]].tolist()), order[n_test:]
        test_coco, test_dir = _subset(pool, test_ids), train_dir
    else:
        test_coco, test_dir = held
    n_val = max(1, round(cfg.val_fraction * len(order)))
    if len(order) - n_val < 1:
        raise DataError(f"{cfg.name}: {len(ids)} training images are too few to split off validation images")
    val_ids = set(ids[order[:n_val]].tolist())
    train_ids = ids[np.sort(order[n_val:])]
    if cfg.train_subset is not None:
        want = round(cfg.train_subset * len(train_ids)) if cfg.train_subset <= 1 else round(cfg.train_subset)
        train_ids = train_ids[: max(1, min(want, len(train_ids)))]
    if not test_coco["images"]:
        raise DataError(f"{cfg.name}: the test part has no images")
    categories = sorted(pool["categories"], key=lambda c: c["id"])

    def part(coco: dict[str, Any], folder: Path, name: str) -> CocoDetection:
        return CocoDetection(coco, folder, masks=masks, in_channels=in_channels, name=f"{cfg.name} {name}")

    return DetectionSplits(train=part(_subset(pool, set(train_ids.tolist())), train_dir, "train"),
                           val=part(_subset(pool, val_ids), train_dir, "val"),
                           test=part(test_coco, test_dir, "test"), categories=categories)
