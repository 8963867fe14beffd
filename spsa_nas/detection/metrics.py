"""COCO mAP of a detector's predictions with pycocotools' COCOeval (AP, AP50, AP75, APs/m/l).

pycocotools is the reference implementation of the COCO metrics (the numbers papers and the
SPSA paper's Table 2 report); our ground truth is already a COCO dict, so it is evaluated as
it is. torchmetrics' MeanAveragePrecision would wrap the same evaluator (or faster_coco_eval)
behind a tensor interface and add a dependency, for nothing we need.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from spsa_nas.detection.data import quiet_coco

__all__ = ["METRIC_NAMES", "coco_map", "detections_of"]

#: Names of COCOeval's first six statistics, in order (AP@[.5:.95], @.5, @.75, small/medium/large).
METRIC_NAMES: tuple[str, ...] = ("ap", "ap50", "ap75", "aps", "apm", "apl")


def detections_of(prediction: dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int],
                  *, masks: bool = False, mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """COCO result entries of one image's torchvision prediction (boxes x1y1x2y2, labels 1..K)."""
    boxes = prediction["boxes"].detach().float().cpu()
    scores = prediction["scores"].detach().float().cpu().tolist()
    labels = prediction["labels"].detach().cpu().tolist()
    out: list[dict[str, Any]] = []
    encoded: list[dict[str, Any]] = []
    if masks and len(labels):
        from pycocotools import mask as mask_utils

        binary = (prediction["masks"].detach().cpu()[:, 0] >= mask_threshold).numpy().astype(np.uint8)
        encoded = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for i, (box, score, label) in enumerate(zip(boxes.tolist(), scores, labels, strict=True)):
        if not 1 <= label <= len(category_ids):
            continue  # RetinaNet's unused background class
        entry = {"image_id": int(image_id), "category_id": int(category_ids[label - 1]),
                 "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)}
        if masks:
            entry["segmentation"] = encoded[i]
        out.append(entry)
    return out


def coco_map(ground_truth: dict[str, Any], detections: Sequence[dict[str, Any]],
             iou_type: str = "bbox") -> dict[str, float | None]:
    """COCO AP, AP50, AP75, APs, APm, APl (fractions in [0, 1]) of `detections` against a COCO
    dict; None where the ground truth has no object of that size. No detections give AP 0."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"coco_map: iou_type must be bbox or segm, got {iou_type!r}")
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    gt = quiet_coco(ground_truth)
    known = {r["id"] for r in ground_truth["images"]}
    results = []
    for k, det in enumerate(detections, start=1):
        if det["image_id"] not in known:
            raise ValueError(f"coco_map: detection {k} is of image {det['image_id']}, which the "
                             "ground truth does not have")
        entry = {**det, "id": k, "iscrowd": 0}
        width, height = det["bbox"][2:]
        entry["area"] = (float(mask_utils.area(det["segmentation"])) if iou_type == "segm"
                         else float(width * height))
        results.append(entry)
    dt = quiet_coco({"images": ground_truth["images"], "categories": ground_truth["categories"],
                     "annotations": results})
    evaluator = COCOeval(gt, dt, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats[:6]
    return {name: (float(v) if v >= 0 else None) for name, v in zip(METRIC_NAMES, stats, strict=True)}
