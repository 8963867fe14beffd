"""The detection path of a trial (run_trial branches here for a detection spec): evaluation and ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from spsa_nas.detection.evaluate import DetectionResult, evaluate_detection_spec
from spsa_nas.spec import ArchSpec

__all__ = ["evaluate_detection", "export_detector", "is_detector"]


def is_detector(model_or_spec: Any) -> bool:
    """Whether a spec, or a model built from one, is a detection spec's."""
    spec = model_or_spec if isinstance(model_or_spec, ArchSpec) else getattr(model_or_spec, "spec", None)
    return isinstance(spec, ArchSpec) and spec.task == "detection"


def evaluate_detection(spec: ArchSpec, **options: Any) -> DetectionResult:
    """spsa_nas.evaluate_spec's counterpart for a detection spec (same keywords and hooks): latency
    of the whole detector, training on the detection data, COCO metrics in the trial's attrs."""
    return evaluate_detection_spec(spec, **options)


def export_detector(model: nn.Module, path: str | Path) -> Path:
    """The detector's ONNX file at `path` (spsa_nas.detection.export)."""
    from spsa_nas.detection.export import export_detector_onnx

    return export_detector_onnx(model, path)
