"""The architecture spec (ArchSpec/StageSpec) and the torch-free table of backbones it refers to."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

SCHEMA_VERSION = 1

#: Names of the channel attentions `spsa_nas.attention.create_attention` builds. The attention
#: registry is tested to hold exactly these; kept here so that validation needs no torch.
CHANNEL_ATTENTIONS: tuple[str, ...] = ("none", "se", "eca", "cbam", "fca", "simam")

#: How the stage's spatial attention (SPSA, or the non-local / GC block in its place) and its
#: channel attention are chained when both are present.
#: "channel_first": x -> channel attention -> SPSA (CBAM's order: channel, then spatial);
#: "spsa_first": x -> SPSA (or NL / GC) -> channel attention.
AttnOrder = Literal["channel_first", "spsa_first"]

#: How SPSA relates a pixel to its key: "correlation" = Pearson correlation over the group's
#: channels (the paper's operator); "cosine" = cosine similarity (the dot-product variant of the
#: paper's Table 4). Kept here (no torch) and tested equal to spsa_nas.attention.spsa.SIMILARITIES.
Similarity = Literal["correlation", "cosine"]

#: A heavier spatial attention a stage may carry INSTEAD of SPSA: "nonlocal" = the non-local block
#: (embedded Gaussian, Wang et al. 2018), "gc" = the global-context block (Cao et al. 2019); the
#: baselines of the SPSA paper's Table 2 (spsa_nas.attention.nonlocal_block / .gc).
SpatialAttn = Literal["none", "nonlocal", "gc"]

Backbone = Literal[
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "mobilenet_v2",
    "shufflenet_v2_x1_0",
]
Stem = Literal["imagenet", "cifar"]
#: What a spec's model does: classify images, or detect objects (a torchvision detector around the
#: backbone with an FPN, spsa_nas.detection).
Task = Literal["classification", "detection"]
Detector = Literal["fasterrcnn", "retinanet", "maskrcnn"]

BACKBONES: tuple[str, ...] = get_args(Backbone)
STEMS: tuple[str, ...] = get_args(Stem)
ATTN_ORDERS: tuple[str, ...] = get_args(AttnOrder)
SIMILARITIES: tuple[str, ...] = get_args(Similarity)
SPATIAL_ATTENTIONS: tuple[str, ...] = get_args(SpatialAttn)
TASKS: tuple[str, ...] = get_args(Task)
DETECTORS: tuple[str, ...] = get_args(Detector)
#: Backbones a detector can be built on (torchvision's FPN extractor takes ResNet-named stages).
DETECTION_BACKBONES: tuple[str, ...] = tuple(b for b in get_args(Backbone) if b.startswith("res"))

MAX_ALPHA = 10.0  # (1 - sigmoid(r)) ** 10 is already below 0.045 everywhere: beyond is absurd


@dataclass(frozen=True)
class StageInfo:
    """One stage of a backbone, as the attention inserted in it sees it."""

    name: str  # torchvision's module name of the stage ("layer1", "features.2-3", "stage2")
    channels: int  # channels the attention modules of this stage receive
    stride: int  # spatial stride of the stage (its first block)
    blocks: int  # number of blocks in the stage (each gets its own attention modules)


def make_divisible(value: float, divisor: int) -> int:
    """Round `value` to the nearest multiple of `divisor`, never more than 10% down (MobileNet)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


_RESNET_BLOCKS = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    "resnext50_32x4d": (3, 4, 6, 3),
}
# MobileNetV2's inverted-residual settings (expansion t, channels c, repeats n, stride s).
MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
SHUFFLENET_V2_X1_0_CHANNELS = (24, 116, 232, 464, 1024)
SHUFFLENET_V2_REPEATS = (4, 8, 4)


def stage_table(backbone: str, width: float = 1.0) -> tuple[StageInfo, ...]:
    """The stages of `backbone` at width multiplier `width`.

    The attention channels of a stage are: for ResNets/ResNeXt the block's output channels
    (after the last BN); for MobileNetV2 the projection's output channels; for ShuffleNetV2 the
    channels of the right branch (half the stage's output), where the attention sits before the
    concatenation and channel shuffle.
    """
    if backbone in _RESNET_BLOCKS:
        bottleneck = backbone not in ("resnet18", "resnet34")
        divisor = 16 if backbone.startswith("resnext") else 8
        expansion = 4 if bottleneck else 1
        return tuple(
            StageInfo(
                name=f"layer{i + 1}",
                channels=make_divisible(64 * width * 2**i, divisor) * expansion,
                stride=1 if i == 0 else 2,
                blocks=n,
            )
            for i, n in enumerate(_RESNET_BLOCKS[backbone])
        )
    if backbone == "mobilenet_v2":
        stages = []
        first = 1  # features[0] is the stem conv; the inverted residuals follow
        for c_t, c, n, s in MOBILENET_V2_SETTINGS:
            del c_t
            last = first + n - 1
            name = f"features.{first}" if n == 1 else f"features.{first}-{last}"
            stages.append(StageInfo(name, make_divisible(c * width, 8), s, n))
            first = last + 1
        return tuple(stages)
    if backbone == "shufflenet_v2_x1_0":
        return tuple(
            StageInfo(
                name=f"stage{i + 2}",
                channels=make_divisible(SHUFFLENET_V2_X1_0_CHANNELS[i + 1] * width, 4) // 2,
                stride=2,
                blocks=n,
            )
            for i, n in enumerate(SHUFFLENET_V2_REPEATS)
        )
    raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")


def stem_stride(backbone: str, stem: str) -> int:
    """Spatial stride of the stem: ImageNet stems stride 4 (ResNet, ShuffleNet) or 2 (MobileNet);
    the CIFAR stem (3x3 conv, stride 1, no max-pool) keeps the input's resolution."""
    if stem == "cifar":
        return 1
    return 2 if backbone == "mobilenet_v2" else 4


def feature_sizes(backbone: str, stem: str, input_size: int) -> tuple[int, ...]:
    """Side of each stage's output feature map for a square input of side `input_size`."""
    size = input_size
    for _ in range(int(math.log2(stem_stride(backbone, stem)))):
        size = math.ceil(size / 2)
    sizes = []
    for stage in stage_table(backbone):
        if stage.stride == 2:
            size = math.ceil(size / 2)
        sizes.append(size)
    return tuple(sizes)


#: StageSpec fields left out of its JSON while they hold these defaults: they came after specs were
#: first stored (and used as cache keys), so a spec that does not use them serialises as before.
_LATER_STAGE_FIELDS: dict[str, object] = {
    "spsa_reverse": True,
    "spsa_similarity": "correlation",
    "spatial_attn": "none",
}


class StageSpec(BaseModel):
    """The attention of one stage: SPSA on/off with its heads, alpha, gate direction and similarity,
    or instead of SPSA a heavier spatial attention (non-local or global context); and a channel
    attention, chained with the spatial one in `attn_order`.

    `spsa_reverse` and `spsa_similarity` are SPSA's ablation switches (the paper's Fig. 3 and
    Table 4): reverse true is the paper's gate A = (1 - sigmoid(r)) ** alpha, false is
    sigmoid(r) ** alpha; similarity is how r is computed. Like heads and alpha they describe SPSA
    and are refused with other than their defaults where `spsa` is false (no phantom choices).
    `spatial_attn` other than "none" is an alternative to SPSA: refused together with `spsa: true`.
    The three fields are left out of the JSON while at their defaults (older specs' JSON stays
    byte-identical; see `_LATER_STAGE_FIELDS`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    spsa: bool = False
    spsa_heads: int = Field(1, ge=1, description="contiguous channel groups; must divide channels")
    spsa_alpha: float = Field(1.0, gt=0.0, le=MAX_ALPHA, description="exponent of the gate")
    channel_attn: str = "none"
    attn_order: AttnOrder = "channel_first"
    spsa_reverse: bool = Field(True, description="true: gate (1 - sigmoid(r))**alpha (the paper's); "
                                                 "false: sigmoid(r)**alpha")
    spsa_similarity: Similarity = Field("correlation", description="correlation (Pearson, the "
                                                                   "paper's) or cosine")
    spatial_attn: SpatialAttn = Field("none", description="nonlocal or gc: a spatial attention "
                                                          "instead of SPSA")

    @model_serializer(mode="wrap")
    def _omit_later_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        data = handler(self)
        for name, default in _LATER_STAGE_FIELDS.items():
            if getattr(self, name) == default:
                data.pop(name, None)
        return data

    @property
    def spatial(self) -> str:
        """The stage's spatial attention in one word: "spsa", "nonlocal", "gc" or "none"."""
        return "spsa" if self.spsa else self.spatial_attn

    @field_validator("channel_attn")
    @classmethod
    def _known_attention(cls, value: str) -> str:
        if value not in CHANNEL_ATTENTIONS:
            raise ValueError(
                f"unknown channel attention {value!r}; valid: {', '.join(CHANNEL_ATTENTIONS)}"
            )
        return value

    @field_validator("spsa_alpha")
    @classmethod
    def _finite_alpha(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("spsa_alpha must be a finite number in (0, 10]")
        return value


class DetectorSpec(BaseModel):
    """The detector around a detection spec's backbone: torchvision's Faster R-CNN, RetinaNet or
    Mask R-CNN over an FPN of `fpn_channels` channels (spsa_nas.detection builds it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Detector
    fpn_channels: int = Field(256, ge=8, le=1024, description="channels of every FPN level")


class ArchSpec(BaseModel):
    """A whole candidate architecture: backbone, stem, width, classes and one StageSpec per stage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    backbone: Backbone
    num_classes: int = Field(1000, ge=2, le=100_000)
    in_channels: int = Field(3, ge=1, le=64)
    stem: Stem = "imagenet"
    input_size: int = Field(224, ge=8, le=4096, description="side of the square input it is for")
    width: float = Field(1.0, gt=0.0, le=4.0, description="channel width multiplier")
    stages: tuple[StageSpec, ...]
    # detection: num_classes counts the background as class 0 (torchvision's convention), so a
    # dataset of K categories needs num_classes K + 1; input_size is the side images are resized to
    task: Task = "classification"
    detector: DetectorSpec | None = None

    @field_validator("detector", mode="before")
    @classmethod
    def _detector_by_name(cls, value: object) -> object:
        return {"name": value} if isinstance(value, str) else value  # "fasterrcnn" is short for it

    @model_serializer(mode="wrap")
    def _omit_task_of_classifiers(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        # a classifier's JSON stays what it was before detection existed (stored specs, cache keys)
        data = handler(self)
        if self.task == "classification" and self.detector is None:
            data.pop("task", None)
            data.pop("detector", None)
        return data

    @model_validator(mode="after")
    def _fits_backbone(self) -> ArchSpec:
        if self.task == "detection":
            if self.detector is None:
                raise ValueError(f"detector: a detection spec needs one; valid: {', '.join(DETECTORS)}")
            if self.backbone not in DETECTION_BACKBONES:
                raise ValueError(f"backbone: {self.backbone} cannot carry a detector; valid: "
                                 f"{', '.join(DETECTION_BACKBONES)}")
        elif self.detector is not None:
            raise ValueError("detector: only a spec with task 'detection' has one")
        table = stage_table(self.backbone, self.width)
        if len(self.stages) != len(table):
            raise ValueError(
                f"stages: {self.backbone} has {len(table)} stages "
                f"({', '.join(s.name for s in table)}), got {len(self.stages)}"
            )
        for i, (stage, info) in enumerate(zip(self.stages, table, strict=True)):
            if not stage.spsa:
                for name in ("spsa_reverse", "spsa_similarity"):
                    if getattr(stage, name) != _LATER_STAGE_FIELDS[name]:
                        raise ValueError(
                            f"stages.{i}.{name}: {getattr(stage, name)!r} is a switch of SPSA, which "
                            f"is off in this stage; set spsa: true or leave {name} out"
                        )
                continue
            if stage.spatial_attn != "none":
                raise ValueError(
                    f"stages.{i}.spatial_attn: {stage.spatial_attn!r} is an alternative to SPSA, "
                    "which is on in this stage; choose one (spsa: false for "
                    f"{stage.spatial_attn!r}, or spatial_attn: none for SPSA)"
                )
            if info.channels % stage.spsa_heads:
                divisors = [h for h in range(1, info.channels // 2 + 1)
                            if info.channels % h == 0 and info.channels // h >= 2][:12]
                raise ValueError(
                    f"stages.{i}.spsa_heads: {stage.spsa_heads} does not divide the "
                    f"{info.channels} channels of {self.backbone} {info.name}; "
                    f"valid heads include {divisors}"
                )
            if info.channels // stage.spsa_heads < 2:
                raise ValueError(
                    f"stages.{i}.spsa_heads: {stage.spsa_heads} heads leave fewer than 2 "
                    f"channels per head in {info.name} ({info.channels} channels)"
                )
        return self

    def stage_info(self) -> tuple[StageInfo, ...]:
        """The backbone's stages at this spec's width."""
        return stage_table(self.backbone, self.width)

    def feature_sizes(self) -> tuple[int, ...]:
        """Side of each stage's output feature map at `input_size`."""
        return feature_sizes(self.backbone, self.stem, self.input_size)

    @classmethod
    def plain(cls, backbone: str, **fields: object) -> ArchSpec:
        """A spec with no attention in any stage (torchvision's model when the stem is ImageNet's)."""
        n = len(stage_table(backbone))
        return cls(backbone=backbone, stages=[StageSpec()] * n, **fields)  # type: ignore[arg-type]

    @classmethod
    def uniform(cls, backbone: str, stage: StageSpec, **fields: object) -> ArchSpec:
        """A spec with the same StageSpec in every stage."""
        n = len(stage_table(backbone))
        return cls(backbone=backbone, stages=[stage] * n, **fields)  # type: ignore[arg-type]
