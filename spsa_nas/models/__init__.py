"""The model factory: hybrid CNN-attention backbones built from an ArchSpec, and weight loading."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from spsa_nas.models._attn import (
    RESNET_ECA_KERNELS,
    BlockAttention,
    eca_adaptive_kernel,
    set_memory_efficient,
)
from spsa_nas.models.mobilenet import MobileNetV2
from spsa_nas.models.resnet import ResNet
from spsa_nas.models.shufflenet import ShuffleNetV2
from spsa_nas.models.weights import LoadReport, Weights, load_state_dict_file, load_weights
from spsa_nas.spec import ArchSpec

__all__ = [
    "BACKBONES",
    "RESNET_ECA_KERNELS",
    "BlockAttention",
    "LoadReport",
    "build_model",
    "eca_adaptive_kernel",
    "load_state_dict_file",
    "load_weights",
    "set_memory_efficient",
]

#: Backbone name -> model class taking the ArchSpec (keys == spsa_nas.spec.Backbone's values).
BACKBONES: dict[str, Callable[[ArchSpec], nn.Module]] = {
    "resnet18": ResNet,
    "resnet34": ResNet,
    "resnet50": ResNet,
    "resnet101": ResNet,
    "resnet152": ResNet,
    "resnext50_32x4d": ResNet,
    "mobilenet_v2": MobileNetV2,
    "shufflenet_v2_x1_0": ShuffleNetV2,
}


def build_model(spec: ArchSpec, weights: Weights | None = None, *,
                memory_efficient: bool = True) -> nn.Module:
    """Build the model `spec` describes; load `weights` (state_dict or file) when given.

    A detection spec (`task: detection`) gives its detector (spsa_nas.detection.build_detector).

    The model carries its spec as `model.spec` and, when weights were given, the `LoadReport`
    as `model.load_report` (None otherwise). `memory_efficient` (default True): in training,
    blocks with SPSA run their last BN and attention again in the backward pass instead of
    keeping SPSA's full-size input alive (no effect on results, nor on blocks without SPSA;
    `set_memory_efficient` switches it later).
    """
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"build_model needs an ArchSpec, got {type(spec).__name__}")
    if spec.task == "detection":
        from spsa_nas.detection.model import build_detector  # torchvision's detection package: only here

        return build_detector(spec, weights, memory_efficient=memory_efficient)
    if spec.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {spec.backbone!r}; valid: {', '.join(BACKBONES)}")
    if not isinstance(memory_efficient, bool):
        raise TypeError(f"build_model: memory_efficient must be a bool, got {memory_efficient!r}")
    model = BACKBONES[spec.backbone](spec)
    set_memory_efficient(model, memory_efficient)
    model.spec = spec
    model.load_report = None if weights is None else load_weights(model, weights)
    return model
