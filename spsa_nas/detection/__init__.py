"""Object detection with hybrid backbones: detectors from specs, COCO data, mAP, training, one trial."""

from __future__ import annotations

from spsa_nas.detection.data import CocoDetection, DetectionSplits, load_detection_data
from spsa_nas.detection.evaluate import DetectionResult, count_detector, evaluate_detection_spec
from spsa_nas.detection.metrics import coco_map
from spsa_nas.detection.model import build_detector, transfer_backbone
from spsa_nas.detection.shapes import generate_shapes
from spsa_nas.detection.train import evaluate_detector, train_detector

__all__ = [
    "CocoDetection",
    "DetectionResult",
    "DetectionSplits",
    "build_detector",
    "coco_map",
    "count_detector",
    "evaluate_detection_spec",
    "evaluate_detector",
    "generate_shapes",
    "load_detection_data",
    "train_detector",
    "transfer_backbone",
]
