"""ONNX export of a detector: torchvision's detectors through torch's TorchScript-based exporter.

torch's dynamo-based exporter (the one spsa_nas.export uses for classifiers) cannot export
torchvision's detectors: `torch.export` stops at their data-dependent control flow (the number of
boxes left after the score threshold and NMS). torchvision writes its detectors to be traced by the
TorchScript-based exporter (`dynamo=False`, opset >= 11), which keeps that count dynamic; Faster
R-CNN, RetinaNet and Mask R-CNN export this way, with SPSA traced as plain operators in eval mode.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from spsa_nas.export import SPEC_METADATA_KEY
from spsa_nas.spec import ArchSpec

__all__ = ["DETECTOR_OPSET", "export_detector_onnx"]

DETECTOR_OPSET = 17  # the TorchScript-based exporter's; onnxruntime >= 1.14 runs it


def export_detector_onnx(model: nn.Module, path: str | Path, *, opset: int = DETECTOR_OPSET) -> Path:
    """Export a detector built by build_detector, in eval mode, to an ONNX file at `path`.

    Input `images`: (1, C, S, S) floats in [0, 1] with S the spec's input_size; outputs `boxes`
    (N, 4; x1, y1, x2, y2 in input pixels), `labels` (N), `scores` (N) and, for Mask R-CNN, `masks`
    (N, 1, S, S), N dynamic. The spec's JSON is in the metadata under SPEC_METADATA_KEY. The
    model's training flag is restored.
    """
    import onnx

    spec = getattr(model, "spec", None)
    if not isinstance(spec, ArchSpec) or spec.task != "detection" or spec.detector is None:
        raise ValueError("export_detector_onnx: the model is not a detector built from a detection spec")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    param = next(model.parameters())
    example = torch.rand((1, spec.in_channels, spec.input_size, spec.input_size),
                         generator=torch.Generator().manual_seed(0)).to(param.device)
    outputs = ["boxes", "labels", "scores"] + (["masks"] if spec.detector.name == "maskrcnn" else [])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's chatter about data-dependent shapes
            torch.onnx.export(model, (example,), str(path), opset_version=opset, dynamo=False,
                              input_names=["images"], output_names=outputs,
                              dynamic_axes={name: {0: "detections"} for name in outputs})
    except Exception as exc:
        name = spec.detector.name
        raise RuntimeError(f"ONNX export of {name} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    graph = onnx.load(str(path))
    entry = graph.metadata_props.add()
    entry.key, entry.value = SPEC_METADATA_KEY, spec.model_dump_json()
    onnx.save(graph, str(path))
    return path
