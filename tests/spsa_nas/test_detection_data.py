"""Detection data and metrics: the generated shapes in COCO format, the COCO loader confined to the
data root, the train/val/test parts, and pycocotools' mAP (perfect → 1, empty → 0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spsa_nas.config import DataConfig, TrainConfig
from spsa_nas.data.errors import DataError
from spsa_nas.detection import build_detector, coco_map, generate_shapes, load_detection_data, train_detector
from spsa_nas.detection.data import CocoDetection, detection_num_classes
from spsa_nas.detection.metrics import detections_of
from spsa_nas.spec import ArchSpec

SIZE = 64


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


def _cfg(root: Path, **fields: object) -> DataConfig:
    return DataConfig(name="shapes", data_root=str(root), shapes_images=16, shapes_size=SIZE, **fields)


def test_shapes_boxes_and_masks_agree_and_generation_is_deterministic(tmp_path: Path) -> None:
    a = generate_shapes(tmp_path / "a", images=8, size=SIZE, seed=3)
    b = generate_shapes(tmp_path / "b", images=8, size=SIZE, seed=3)
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert (a / name).read_text() == (b / name).read_text()
        coco = json.loads((a / name).read_text())
        assert [c["name"] for c in coco["categories"]] == ["square", "circle", "triangle"]
        dataset = CocoDetection(coco, a / split, masks=True)
        for index in range(len(dataset)):
            image, target = dataset[index]
            assert image.shape == (3, SIZE, SIZE) and image.min() >= 0 and image.max() <= 1
            assert len(target["boxes"]) >= 1
            for box, mask in zip(target["boxes"], target["masks"], strict=True):
                ys, xs = np.nonzero(mask.numpy())
                assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert int(target["masks"].sum(dim=0).max()) == 1  # objects do not overlap


def test_splits_are_disjoint_and_the_val_split_is_the_test_part(shapes_root: Path) -> None:
    splits = load_detection_data(_cfg(shapes_root), masks=False)
    ids = [{r["id"] for r in part.records} for part in (splits.train, splits.val, splits.test)]
    assert all(ids) and not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    val_json = next(shapes_root.glob("shapes-*/annotations/instances_val.json"))
    assert ids[2] == {r["id"] for r in json.loads(val_json.read_text())["images"]}
    assert splits.num_classes == 4 == detection_num_classes(_cfg(shapes_root))


def _write_coco(folder: Path, file_name: str) -> None:
    (folder / "annotations").mkdir(parents=True)
    (folder / "train").mkdir()
    coco = {"images": [{"id": i, "file_name": file_name, "height": 8, "width": 8} for i in (1, 2, 3)],
            "annotations": [], "categories": [{"id": 7, "name": "thing"}]}
    (folder / "annotations" / "instances_train.json").write_text(json.dumps(coco))


def test_coco_images_and_folders_must_lie_under_the_data_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _write_coco(root / "escape", "../../../outside.png")
    (tmp_path / "outside.png").write_bytes(b"")
    splits = load_detection_data(DataConfig(name="coco", data_root=str(root), path="escape"), masks=False)
    with pytest.raises(DataError, match="outside the data root"):
        splits.test[0]
    with pytest.raises(DataError, match="outside the data root"):
        load_detection_data(DataConfig(name="coco", data_root=str(root), path="../elsewhere"), masks=False)
    with pytest.raises(DataError, match=r"set dataset\.path"):
        load_detection_data(DataConfig(name="coco", data_root=str(root)), masks=False)


def test_a_file_that_is_not_coco_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    (folder / "annotations").mkdir(parents=True)
    (folder / "annotations" / "instances_train.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="not a COCO instances file"):
        load_detection_data(DataConfig(name="coco", data_root=str(tmp_path), path="bad"), masks=False)


def _as_prediction(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(target["labels"])
    return {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(n),
            "masks": target["masks"].float().unsqueeze(1)}


def test_perfect_predictions_score_1_and_none_score_0(shapes_root: Path) -> None:
    splits = load_detection_data(_cfg(shapes_root), masks=True)
    test = splits.test
    category_ids = [c["id"] for c in splits.categories]
    boxes, masks = [], []
    for index in range(len(test)):
        _, target = test[index]
        image_id = int(target["image_id"])
        boxes += detections_of(_as_prediction(target), image_id, category_ids)
        masks += detections_of(_as_prediction(target), image_id, category_ids, masks=True)
    perfect = coco_map(test.coco, boxes)
    assert perfect["ap"] == pytest.approx(1.0) and perfect["ap50"] == pytest.approx(1.0)
    assert coco_map(test.coco, masks, "segm")["ap"] == pytest.approx(1.0)
    empty = coco_map(test.coco, [])
    assert empty["ap"] == 0.0 and empty["ap50"] == 0.0 and empty["ap75"] == 0.0
    wrong_class = [{**d, "category_id": 1 + d["category_id"] % 3} for d in boxes]
    assert coco_map(test.coco, wrong_class)["ap"] < 1.0
    with pytest.raises(ValueError, match="ground truth does not have"):
        coco_map(test.coco, [{**boxes[0], "image_id": 10_000}])


def test_a_detector_trains_on_shapes_and_reports_validation_ap(shapes_root: Path) -> None:
    splits = load_detection_data(_cfg(shapes_root), masks=False)
    spec = ArchSpec.plain("resnet18", width=0.25, num_classes=splits.num_classes, input_size=SIZE,
                          task="detection", detector={"name": "fasterrcnn", "fpn_channels": 16})
    torch.manual_seed(0)
    model = build_detector(spec)
    seen: list[tuple[int, float]] = []
    report = train_detector(model, splits.train, splits.val, TrainConfig(epochs=1, batch_size=4, lr=0.01,
                                                                         max_steps_per_epoch=2),
                            "cpu", on_epoch=lambda e, ap: seen.append((e, ap)))
    assert report.epochs == 1 and report.steps == 2 and len(report.val_curve) == 1
    assert seen == [(1, report.val_curve[0])] and 0.0 <= report.val_curve[0] <= 1.0
