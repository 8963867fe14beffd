"""One detection trial: build a detector from its spec, count it, time it, reject it or train and test it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spsa_nas.config import DETECTION_DATASETS, DataConfig, LatencyConfig, TrainConfig
from spsa_nas.counting import count_flops, count_params
from spsa_nas.data.errors import DataError
from spsa_nas.detection.data import detection_num_classes, load_detection_data
from spsa_nas.detection.model import build_detector
from spsa_nas.detection.train import evaluate_detector, train_detector
from spsa_nas.evaluate import (
    Cancelled,
    EvalHooks,
    Fit,
    Measurement,
    TrialResult,
    cached_latency,
    check_runtime_for,
    over_latency_budget,
)
from spsa_nas.latency import resolve_device
from spsa_nas.spec import ArchSpec

__all__ = ["DetectionResult", "check_detection_data", "count_detector", "evaluate_detection_spec",
           "reference_detector"]


@dataclass
class DetectionResult(TrialResult):
    """A detection trial's outcome: `val_acc` is the validation box AP (the search's accuracy
    objective), `detection` the test split's COCO metrics (ap, ap50, ap75, aps, apm, apl, and
    mask_* for Mask R-CNN); top1/top5 stay None."""

    detection: dict[str, float | None] = field(default_factory=dict)
    backbone_flops: int = 0

    def metrics(self) -> dict[str, Any]:
        """The classifier's trial attrs plus the COCO metrics, `backbone_flops` and `task`."""
        return {**super().metrics(), **self.detection, "backbone_flops": self.backbone_flops,
                "task": "detection", "accuracy_metric": "COCO box AP on the validation images"}


def check_detection_data(spec: ArchSpec, data: DataConfig) -> None:
    """ValueError unless `spec` is a detection spec whose classes fit the detection dataset."""
    if spec.task != "detection":
        raise ValueError(f"spec.task is {spec.task!r}; a detection trial needs task: detection")
    if data.name not in DETECTION_DATASETS:
        raise ValueError(f"dataset {data.name!r} is classification data; a detection spec needs one of "
                         f"{', '.join(DETECTION_DATASETS)}")
    classes = detection_num_classes(data)
    if spec.num_classes != classes:
        raise ValueError(f"spec.num_classes is {spec.num_classes} but dataset {data.name!r} has "
                         f"{classes - 1} categories + the background = {classes}; "
                         f"set num_classes to {classes}")


def count_detector(model: nn.Module, spec: ArchSpec) -> tuple[int, int, int]:
    """(parameters, MACs of the whole detector, MACs of backbone + FPN) at one input of the spec's size.

    The whole detector's count runs the heads on the proposals and detections a random input
    gives, so it depends on the weights (an untrained Mask R-CNN runs its mask head on 100
    boxes); backbone + FPN are counted on the resized input and do not.
    """
    shape = (1, spec.in_channels, spec.input_size, spec.input_size)
    return count_params(model), count_flops(model, shape), count_flops(model.backbone, shape)


def reference_detector(spec: ArchSpec, cfg: LatencyConfig) -> tuple[nn.Module, str] | None:
    """The latency reference of a detection spec: the same detector, no attention, at
    `cfg.reference_width`; built without touching the global RNG. None without a reference."""
    if cfg.reference_width is None or cfg.protocol == "simple" or spec.detector is None:
        return None
    plain = ArchSpec.plain(spec.backbone, **spec.model_dump(exclude={"backbone", "stages", "width"}),
                           width=cfg.reference_width)
    with torch.random.fork_rng(devices=[]):
        model = build_detector(plain).eval()
    name = f"{spec.detector.name} {spec.backbone} w{cfg.reference_width:g} plain ({spec.input_size} px)"
    return model, name


def evaluate_detection_spec(spec: ArchSpec, *, data: DataConfig, train: TrainConfig, latency: LatencyConfig,
                            device: str = "auto", latency_budget_ms: float | None = None,
                            hooks: EvalHooks | None = None, fit: Fit | None = None,
                            test: bool = True) -> DetectionResult:
    """Run one detection trial of `spec`, in the order and with the hooks of spsa_nas.evaluate_spec.

    Latency: the whole detector (transform, backbone, FPN, heads, post-processing) in eval mode
    on one image of the spec's input size, interleaved with the plain detector at the reference
    width. Training: train_detector on the train part, box AP on the validation part each epoch
    (the search's accuracy objective); the reported COCO metrics are the test part's.
    """
    if fit is not None or not test:  # both are a one-shot candidate's
        raise ValueError("the oneshot strategy trains classifier supernets; search detectors with "
                         "strategy: standalone")
    hooks = hooks or EvalHooks()
    dev = resolve_device(device)
    check_runtime_for(spec, latency, dev)
    check_detection_data(spec, data)
    torch.manual_seed(train.seed)
    model = build_detector(spec)
    params, flops, backbone_flops = count_detector(model, spec)
    model.to(dev).eval()
    lat, cached = cached_latency(model, spec, latency, dev, hooks, reference=reference_detector)
    if hooks.on_measured is not None:
        hooks.on_measured(Measurement(params=params, flops=flops, latency=lat, cached=cached))
    result = DetectionResult(spec=spec, params=params, flops=flops, latency=lat, feasible=True,
                             device=str(dev), backbone_flops=backbone_flops)
    if over_latency_budget(lat, latency_budget_ms, hooks):
        result.feasible = False
        return result
    if hooks.should_stop is not None and hooks.should_stop():
        raise Cancelled("stopped before training")
    if train.image_size not in (None, spec.input_size):
        raise DataError(f"train.image_size {train.image_size} differs from the detector's input_size "
                        f"{spec.input_size}; a detector resizes its images itself: leave image_size unset")
    splits = load_detection_data(data, masks=spec.detector is not None and spec.detector.name == "maskrcnn",
                                 in_channels=spec.in_channels)
    report = train_detector(model, splits.train, splits.val, train, dev, on_epoch=hooks.on_epoch,
                            should_stop=hooks.should_stop)
    result.detection = evaluate_detector(model, splits.test, dev, batch_size=max(train.batch_size, 8),
                                         num_workers=train.num_workers)
    model.to("cpu").eval()
    result.val_curve = report.val_curve
    result.val_acc = report.val_curve[-1] if report.val_curve else None
    result.epochs = report.epochs
    result.train_seconds = report.seconds
    result.model = model
    return result
