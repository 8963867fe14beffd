"""Detectors from a detection ArchSpec: our hybrid ResNet + torchvision's FPN and detector heads.

Nothing of torchvision's detector code is copied: the backbone is `spsa_nas.models.ResNet` (it
keeps torchvision's module names), wrapped by torchvision's `BackboneWithFPN`, and the detector
is torchvision's `FasterRCNN`, `RetinaNet` or `MaskRCNN` built around it. What this module
decides (see docs/detection.md):

- FPN levels: Faster/Mask R-CNN take layer1-4 (strides 4-32) plus a max-pooled P6, as
  torchvision's `fasterrcnn_resnet50_fpn`; RetinaNet takes layer2-4 plus P6/P7 computed from P5
  (torchvision's `retinanet_resnet50_fpn_v2`). Every level has `detector.fpn_channels` channels.
- Input: images are resized so that their sides fit `spec.input_size` (min_size = max_size =
  input_size), and normalised with mean 0 / std 1, i.e. taken as the [0, 1] floats our
  classifiers are trained on, so that a classifier's weights transfer as they are.
- Anchors scale with the input: sizes input_size/16 · 2^level (8-128 px at 128 px; torchvision's
  32-512 are for 800 px images), aspect ratios 0.5/1/2; RetinaNet adds 3 octave scales per level.
- Proposals (two-stage detectors) scale with the image area: 1000 per image at 800x800 (torchvision's
  test default), at least 100. The RoIs sampled per image for the box head's loss scale the same
  way: half the proposals, 64-512 (torchvision's 512 at 800 px). With torchvision's 512 on a small
  input nearly every sampled RoI is background (a shapes image has 1-3 objects among 100-200
  proposals): the classifier learns "background" and little else, and RoIAlign's backward over
  4096 RoIs a batch of 8 was 12% of a training step on the CPU.
- Heads scale with the FPN: the box head's two FC layers have 4 · fpn_channels units and the mask
  head's four convolutions fpn_channels channels (torchvision's 1024 and 256 at its 256-channel
  FPN), so a narrow detector is narrow throughout.
- Classes: `spec.num_classes` includes the background (label 0), torchvision's convention, for
  all three detectors (RetinaNet's label 0 is then a class no box carries).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from spsa_nas.models._attn import set_memory_efficient
from spsa_nas.models.resnet import ResNet
from spsa_nas.models.weights import LoadReport, Weights, load_state_dict_file, load_weights
from spsa_nas.spec import ArchSpec

__all__ = ["anchor_sizes", "backbone_spec", "build_detector", "proposal_count", "roi_samples",
           "transfer_backbone"]

_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def backbone_spec(spec: ArchSpec) -> ArchSpec:
    """The classification spec of a detection spec's backbone (same stages, width, stem, input)."""
    if spec.task != "detection":
        raise ValueError(f"backbone_spec: spec.task is {spec.task!r}, not 'detection'")
    return ArchSpec(**{**spec.model_dump(exclude={"task", "detector"}), "num_classes": 1000})


def anchor_sizes(input_size: int) -> tuple[int, ...]:
    """Anchor side of each of the 5 FPN levels: input_size/16 · 2^level, at least 4 px."""
    return tuple(max(4, round(input_size / 16 * 2**level)) for level in range(5))


def proposal_count(input_size: int) -> int:
    """Region proposals kept per image (after NMS) for an input of `input_size`² pixels."""
    return max(100, min(1000, round(1000 * input_size**2 / 800**2)))


def roi_samples(input_size: int) -> int:
    """RoIs sampled per image for the box head's loss: half the proposals, 64-512."""
    return max(64, min(512, proposal_count(input_size) // 2))


def _backbone(spec: ArchSpec) -> BackboneWithFPN:
    if spec.detector is None:
        raise ValueError("a detection spec needs a detector")
    body = ResNet(backbone_spec(spec))
    stages = spec.stage_info()
    first = 1 if spec.detector.name == "retinanet" else 0
    returned = list(range(first, len(stages)))
    channels = spec.detector.fpn_channels
    extra = (LastLevelP6P7(channels, channels) if spec.detector.name == "retinanet"
             else LastLevelMaxPool())
    return BackboneWithFPN(
        body,
        return_layers={stages[i].name: str(k) for k, i in enumerate(returned)},
        in_channels_list=[stages[i].channels for i in returned],
        out_channels=channels,
        extra_blocks=extra,
    )


def build_detector(spec: ArchSpec, weights: Weights | None = None, *,
                   backbone_weights: Weights | None = None, memory_efficient: bool = True) -> nn.Module:
    """The detector `spec` describes (see the module docstring), in training mode.

    `weights`: a whole detector's state_dict or file (e.g. a downloaded trial's), loaded into
    every part; `backbone_weights`: a classifier's weights (e.g. a classification search's best)
    transferred into the backbone only (`transfer_backbone`). The model carries `model.spec` and
    `model.load_report` (the LoadReport of whichever weights were given; None when none were).
    """
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"build_detector needs an ArchSpec, got {type(spec).__name__}")
    if spec.task != "detection" or spec.detector is None:
        raise ValueError("build_detector: the spec is not a detection spec (set task: detection and "
                         "a detector)")
    if weights is not None and backbone_weights is not None:
        raise ValueError("build_detector: give weights (a whole detector) or backbone_weights "
                         "(a classifier), not both")
    backbone = _backbone(spec)
    size = spec.input_size
    mean, std = [0.0] * spec.in_channels, [1.0] * spec.in_channels
    sizes = anchor_sizes(size)
    common = {"min_size": size, "max_size": size, "image_mean": mean, "image_std": std}
    model: nn.Module
    if spec.detector.name == "retinanet":
        octaves = tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for s in sizes)
        anchors = AnchorGenerator(octaves, (_ASPECT_RATIOS,) * len(octaves))
        model = RetinaNet(backbone, spec.num_classes, anchor_generator=anchors, **common)
    else:
        anchors = AnchorGenerator(tuple((s,) for s in sizes), (_ASPECT_RATIOS,) * len(sizes))
        proposals = proposal_count(size)
        channels, hidden = spec.detector.fpn_channels, 4 * spec.detector.fpn_channels
        heads: dict[str, nn.Module] = {
            "box_head": TwoMLPHead(channels * 7 * 7, hidden),  # 7x7: torchvision's RoI pool size
            "box_predictor": FastRCNNPredictor(hidden, spec.num_classes),
        }
        kind: type[FasterRCNN] = FasterRCNN
        if spec.detector.name == "maskrcnn":
            kind = MaskRCNN
            heads["mask_head"] = MaskRCNNHeads(channels, [channels] * 4, 1)
            heads["mask_predictor"] = MaskRCNNPredictor(channels, channels, spec.num_classes)
        model = kind(backbone, None, rpn_anchor_generator=anchors,
                     rpn_pre_nms_top_n_train=2 * proposals, rpn_post_nms_top_n_train=2 * proposals,
                     rpn_pre_nms_top_n_test=proposals, rpn_post_nms_top_n_test=proposals,
                     box_batch_size_per_image=roi_samples(size), **heads, **common)
    set_memory_efficient(model, memory_efficient)
    model.spec = spec
    model.load_report = None
    if weights is not None:
        model.load_report = load_weights(model, weights)
    elif backbone_weights is not None:
        model.load_report = transfer_backbone(model, backbone_weights)
    return model


def transfer_backbone(detector: nn.Module, weights: Weights) -> LoadReport:
    """Load a classifier's weights (torchvision/our ResNet keys) into `detector`'s backbone.

    The report's keys are the backbone's (`layer1.0.conv1.weight`, ...): `loaded` were copied,
    `initialised` kept their initialisation (e.g. attention the classifier lacked), `unexpected`
    are the classifier's tensors the backbone has no place for (its `fc.*` head), `mismatched`
    differ in shape — refused before anything is copied: a classifier of another width or backbone
    is a ValueError. The FPN and the heads stay initialised.
    """
    backbone = getattr(detector, "backbone", None)
    body = getattr(backbone, "body", None)
    if not isinstance(body, nn.Module):
        raise TypeError("transfer_backbone: the model has no backbone.body (not a detector from "
                        "build_detector)")
    state = load_state_dict_file(weights) if isinstance(weights, str | Path) else dict(weights)
    own = body.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched or not any(k in own for k in state):
        raise ValueError(f"transfer_backbone: the weights do not fit the backbone ({len(mismatched)} tensors "
                         f"differ in shape, e.g. {mismatched[:3]}); they must be a classifier of the same "
                         "backbone and width")
    return load_weights(body, state)
