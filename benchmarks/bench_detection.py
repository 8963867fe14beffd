"""Detector latency with SPSA in every stage against none, batch 1, as JSON (the paper's Table 2 in FPS).

For each detector (Faster R-CNN, RetinaNet, Mask R-CNN) two detectors of the same backbone, width,
FPN and input size (default: the built-in detection_quick space's ResNet-18 w0.25, 32-channel FPN,
96 px): one with no attention, one with SPSA (1 head, alpha 1) in every block of every stage.

- Torch (eager, eval, inference mode): spsa_nas.latency.measure_group, the search's interleaved
  protocol, with the plain detector as the reference: the SPSA detector's block means are divided
  by the plain one's of the same round, so the ratio and its confidence interval are immune to
  drifts of a shared machine. FPS = 1000 / median ms.
- onnxruntime (--onnx, default on): both exported by spsa_nas.detection.export (the TorchScript
  exporter; torch.export cannot take torchvision's detectors), CPU provider, as many intra-op
  threads as the measurement's torch threads, calls alternated between the two, median of each.
- Untrained detectors keep a data-dependent number of boxes; both variants here have their score
  thresholds at 0, so their heads work on the same number of boxes (the per-image caps) and the
  ratio is what SPSA costs, not a difference in how many boxes random weights happen to keep.

The machine's load average (os.getloadavg) is recorded before and after each detector.

Usage: python benchmarks/bench_detection.py [--backbone resnet18] [--width 0.25] [--input-size 96]
       [--fpn-channels 32] [--detectors fasterrcnn,retinanet,maskrcnn] [--device cpu|cuda]
       [--threads 1] [--max-time-s 10] [--no-onnx] [--quick]
`--quick`: a smoke run (2 s per model, Faster R-CNN only); its figures mean little.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from cli_args import count, positive
from torch import nn

from spsa_nas.config import LatencyConfig
from spsa_nas.detection import build_detector
from spsa_nas.latency import measure_group, resolve_device
from spsa_nas.spec import ArchSpec, StageSpec


def _detector(args: argparse.Namespace, name: str, spsa: bool) -> nn.Module:
    spec = ArchSpec.uniform(args.backbone, StageSpec(spsa=spsa), width=args.width, input_size=args.input_size,
                            num_classes=4, task="detection",
                            detector={"name": name, "fpn_channels": args.fpn_channels})
    torch.manual_seed(0)
    model = build_detector(spec).eval()
    if name == "retinanet":
        model.score_thresh = 0.0
    else:
        model.roi_heads.score_thresh = 0.0
    return model


def _onnx_ms(models: dict[str, nn.Module], size: int, threads: int, seconds: float) -> dict[str, Any]:
    import onnxruntime as ort

    from spsa_nas.detection.export import export_detector_onnx

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = export_detector_onnx(model, Path(tmp) / f"{name}.onnx")
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = {"images": torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).numpy()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, x)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(len(t) for t in times.values()) < 10:
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, x)
            times[name].append((time.perf_counter() - start) * 1000)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"median_ms": medians, "calls": {n: len(t) for n, t in times.items()},
            "ratio": medians["spsa"] / medians["none"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--width", type=positive, default=0.25)
    parser.add_argument("--input-size", type=count(), default=96)
    parser.add_argument("--fpn-channels", type=count(), default=32)
    parser.add_argument("--detectors", default="fasterrcnn,retinanet,maskrcnn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=count(), default=1)
    parser.add_argument("--max-time-s", type=positive, default=10.0)
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    detectors = ["fasterrcnn"] if args.quick else args.detectors.split(",")
    seconds = 2.0 if args.quick else args.max_time_s
    device = resolve_device(args.device)
    cfg = LatencyConfig(threads=args.threads, max_time_s=seconds, max_warmup_s=min(5.0, seconds))
    results = []
    for name in detectors:
        load_before = os.getloadavg()
        plain, spsa = _detector(args, name, False), _detector(args, name, True)
        measured = measure_group({"spsa": spsa}, (3, args.input_size, args.input_size), cfg, device,
                                 reference=plain, reference_name="none")
        none_ms, spsa_r = measured["__reference__"].median_ms, measured["spsa"]
        with torch.inference_mode():
            x = torch.rand(1, 3, args.input_size, args.input_size).to(device)
            boxes = {k: len(m.to(device)(x)[0]["boxes"]) for k, m in (("none", plain), ("spsa", spsa))}
        entry: dict[str, Any] = {
            "detector": name,
            "none_ms": none_ms,
            "spsa_ms": spsa_r.median_ms,
            "none_fps": 1000 / none_ms,
            "spsa_fps": 1000 / spsa_r.median_ms,
            "ratio": spsa_r.ratio,
            "ratio_ci": [spsa_r.ratio_ci_low, spsa_r.ratio_ci_high],
            "converged": spsa_r.converged,
            "blocks": spsa_r.blocks,
            "boxes": boxes,
        }
        if not args.no_onnx and device.type == "cpu":
            entry["onnxruntime"] = _onnx_ms({"none": plain.cpu(), "spsa": spsa.cpu()}, args.input_size,
                                            args.threads, seconds)
        entry["loadavg_before"], entry["loadavg_after"] = list(load_before), list(os.getloadavg())
        results.append(entry)
    print(json.dumps({
        "backbone": args.backbone, "width": args.width, "input_size": args.input_size,
        "fpn_channels": args.fpn_channels, "batch": 1, "device": str(device), "threads": args.threads,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "quick": args.quick, "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
