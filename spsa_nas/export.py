"""Exporting a model: weights as safetensors (with the spec in the metadata) and ONNX graphs."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spsa_nas.models.weights import load_state_dict_file
from spsa_nas.spec import ArchSpec

__all__ = ["SPEC_METADATA_KEY", "export_model_onnx", "export_onnx", "load_spec", "load_state_dict_file",
           "onnx_graph_sha256", "save_safetensors"]

log = logging.getLogger(__name__)

#: Metadata key (safetensors header and ONNX metadata_props) holding the ArchSpec JSON.
SPEC_METADATA_KEY = "spsa_nas.spec"

#: ONNX opset of the exported graphs (onnxruntime >= 1.14 runs it).
DEFAULT_OPSET = 18


def _spec_json(model: nn.Module) -> str | None:
    spec = getattr(model, "spec", None)
    return spec.model_dump_json() if isinstance(spec, ArchSpec) else None


def save_safetensors(model: nn.Module, path: str | Path) -> Path:
    """Write `model.state_dict()` (contiguous, on the CPU) to `path` as safetensors.

    When the model carries an ArchSpec as `model.spec` (every `build_model` model does), its JSON
    is stored in the file's metadata under `SPEC_METADATA_KEY`, so that `load_spec(path)` and
    `build_model(load_spec(path), weights=path)` rebuild the model from the file alone.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    spec = _spec_json(model)
    save_file(state, str(path), metadata={SPEC_METADATA_KEY: spec} if spec else None)
    return path


def load_spec(path: str | Path) -> ArchSpec | None:
    """The ArchSpec stored in a safetensors file's metadata by `save_safetensors`, or None."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"weights file {path}: not a readable safetensors file ({exc})") from exc
    text = metadata.get(SPEC_METADATA_KEY)
    if text is None:
        return None
    try:
        return ArchSpec.model_validate_json(text)
    except ValueError as exc:
        raise ValueError(f"weights file {path}: the stored spec is not a valid ArchSpec: {exc}") from exc


def _check_input_shape(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4 or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be (N, C, H, W) of positive sizes, got {tuple(input_shape)}")
    spec = getattr(model, "spec", None)
    if isinstance(spec, ArchSpec) and shape[1] != spec.in_channels:
        raise ValueError(f"input_shape {shape} has {shape[1]} channels; the model takes "
                         f"{spec.in_channels} (spec.in_channels)")
    return shape


def export_onnx(model: nn.Module, path: str | Path, input_shape: Sequence[int] | None = None, *,
                opset: int = DEFAULT_OPSET, optimize: bool = True) -> Path:
    """Export `model` in eval mode to an ONNX file at `path` for inputs of `input_shape`
    (default: one image of the size its ArchSpec is for, when built by build_model).

    Uses torch's dynamo-based exporter (`torch.onnx.export(..., dynamo=True)`). SPSA exports as
    its decomposition (`spsa_nas.attention.kernels.composite.spsa_decomposed`: a mean, three
    one-row matmuls for the channel sums and small per-pixel ops; no custom op in the file), so
    any ONNX runtime runs it; the TorchScript exporter (`dynamo=False`) gives the same operators and works too
    (tests/spsa_nas/test_tracing.py). The graph has static shapes (`input_shape`),
    one input `input` and one output `logits`, all weights embedded, and the model's ArchSpec
    JSON (if any) in its metadata under `SPEC_METADATA_KEY`. `optimize` runs onnxscript's graph
    optimiser (smaller, faster graph; slower export). The model's training flag is restored.
    """
    import onnx

    if input_shape is None:
        spec = getattr(model, "spec", None)
        if spec is None:
            raise ValueError("export_onnx: pass input_shape for a model not built by build_model "
                             "(it has no ArchSpec to take the input size from)")
        input_shape = (1, spec.in_channels, spec.input_size, spec.input_size)
    shape = _check_input_shape(model, input_shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation / tracing chatter
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=opset, input_names=["input"],
                output_names=["logits"], optimize=optimize, verify=False, external_data=False,
                verbose=False,
            )
    except Exception as exc:
        raise RuntimeError(f"ONNX export of {type(model).__name__} for input {shape} failed: {exc}") from exc
    finally:
        model.train(was_training)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    spec = _spec_json(model)
    if spec:
        onnx.helper.set_model_props(proto, {SPEC_METADATA_KEY: spec})
    onnx.save_model(proto, str(path))
    log.info("exported %s to %s (opset %d, input %s)", type(model).__name__, path, opset, shape)
    return path


def export_model_onnx(model: nn.Module, path: str | Path, input_shape: Sequence[int] | None = None) -> Path:
    """The ONNX file of any model this project builds: a detector (build_detector, task detection)
    through spsa_nas.detection.export (one image, dynamic detections; `input_shape` must then be
    None or (1, C, S, S)), every other model through `export_onnx`. The one exporter of both the
    trial's download and the onnxruntime latency measurement, so the file measured is the file
    downloaded (docs/latency.md)."""
    spec = getattr(model, "spec", None)
    if isinstance(spec, ArchSpec) and spec.task == "detection":
        from spsa_nas.detection.export import export_detector_onnx  # imports this module

        wanted = (1, spec.in_channels, spec.input_size, spec.input_size)
        if input_shape is not None and tuple(int(s) for s in input_shape) != wanted:
            raise ValueError(f"a detector exports for one image {wanted}, not {tuple(input_shape)}; "
                             "measure a detector at latency.batch_size 1")
        return export_detector_onnx(model, path)
    return export_onnx(model, path, input_shape)


def onnx_graph_sha256(model: str | Path | Any) -> str:
    """SHA-256 of an ONNX model's graph without its weight values: every node, attribute, input and
    output, and every initializer's name, type and shape, but not the numbers in it. Two exports
    of the same architecture agree whatever the weights (trained or not), so the hash recorded
    beside a latency measured in onnxruntime can be compared with the downloaded file's. `model`:
    a path or an onnx.ModelProto."""
    import hashlib

    import onnx

    proto = onnx.load_model(str(model), load_external_data=False) if isinstance(model, (str, Path)) \
        else model
    stripped = onnx.ModelProto()
    stripped.CopyFrom(proto)
    data_fields = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                   "string_data", "external_data")

    def strip(graph: Any) -> None:
        for tensor in graph.initializer:
            for name in data_fields:
                tensor.ClearField(name)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    strip(attribute.g)
                for sub in attribute.graphs:
                    strip(sub)

    strip(stripped.graph)
    return hashlib.sha256(stripped.SerializeToString(deterministic=True)).hexdigest()
