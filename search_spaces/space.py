"""The search-space schema: SearchSpace, its stage choices and alpha ranges, and SpaceError."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from spsa_nas.spec import (
    ATTN_ORDERS,
    BACKBONES,
    CHANNEL_ATTENTIONS,
    DETECTION_BACKBONES,
    DETECTORS,
    MAX_ALPHA,
    SIMILARITIES,
    SPATIAL_ATTENTIONS,
    STEMS,
    StageInfo,
    feature_sizes,
    stage_table,
)

#: What a stage's `spatial` choice may list: no spatial attention, SPSA, or the non-local or GC
#: block in SPSA's place (spsa_nas.spec.StageSpec.spatial).
SPATIAL_CHOICES: tuple[str, ...] = ("none", "spsa", *(a for a in SPATIAL_ATTENTIONS if a != "none"))

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: Where in a space a value sits: field names and list indices (or stage numbers), from the top.
Path_ = tuple[str | int, ...]


class SpaceError(ValueError):
    """A search space that cannot be used; the message names file, line, field and valid values."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class SpaceProblem(ValueError):  # noqa: N818 - internal carrier, becomes SpaceError
    """A semantic problem found by a validator, with the field path it belongs to; the loader
    (search_spaces.loading) turns it into a SpaceError line naming file, line and field."""

    def __init__(self, path: Path_, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AlphaRange(_Model):
    """A continuous (or stepped) range of SPSA's exponent alpha: `{low, high, log?, step?}`."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _sane(self) -> AlphaRange:
        for name in ("low", "high"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= MAX_ALPHA):
                raise SpaceProblem((name,), f"{value:g} is out of (0, {MAX_ALPHA:g}]")
        if self.low >= self.high:
            raise SpaceProblem(("high",), f"high ({self.high:g}) must be greater than low ({self.low:g})")
        if self.step is not None:
            if self.log:
                raise SpaceProblem(("step",), "step cannot be combined with log: true")
            if not self.step > 0:
                raise SpaceProblem(("step",), f"step must be positive, got {self.step:g}")
        return self

    def values(self) -> list[float] | None:
        """The discrete values when `step` is given, else None (continuous)."""
        if self.step is None:
            return None
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        return [round(self.low + i * self.step, 10) for i in range(count)]


def _unique(values: list[Any], path: str) -> list[Any]:
    if not values:
        raise SpaceProblem((), f"{path} needs at least one value")
    seen: list[Any] = []
    for value in values:
        if value in seen:
            raise SpaceProblem((), f"{value!r} is listed twice")
        seen.append(value)
    return values


def _known(values: list[str], valid: tuple[str, ...], what: str, path: str) -> list[str]:
    """`values` when each is one of `valid` and none repeats; else a SpaceProblem at the bad one."""
    for i, name in enumerate(values):
        if name not in valid:
            raise SpaceProblem((i,), f"unknown {what} {name!r}; valid: {', '.join(valid)}")
    return _unique(values, path)


def _spsa_states(spatial: list[str]) -> list[bool]:
    """The SPSA states (off / on) a `spatial` choice can take, in its order."""
    states = [name == "spsa" for name in spatial]
    return list(dict.fromkeys(states))


class StageChoices(_Model):
    """What the search may choose in one stage. Unset fields take the `all_stages` template's value.

    The spatial attention is given either as `spsa` (off / on) or as `spatial` (a subset of none,
    spsa, nonlocal, gc: SPSA or a heavier spatial attention in its place), not both; with
    `spatial`, `spsa` is derived from it (on where `spatial` lists spsa) so that `spsa` always
    says which SPSA states the stage can take.
    """

    spsa: list[bool] = [False, True]  # SPSA off / on
    spatial: list[str] | None = None  # instead of `spsa`: subset of SPATIAL_CHOICES
    heads: list[int] = [1]  # SPSA heads (contiguous channel groups); must divide the channels
    alpha: list[float] | AlphaRange = [1.0]  # SPSA's exponent: a set, or a range {low, high, ...}
    spsa_reverse: list[bool] = [True]  # SPSA's gate: (1 - sigmoid(r))**alpha (true) or sigmoid(r)**alpha
    spsa_similarity: list[str] = ["correlation"]  # SPSA's r: Pearson correlation or cosine
    channel_attn: list[str] = ["none"]  # subset of spsa_nas.spec.CHANNEL_ATTENTIONS
    attn_order: list[str] = ["channel_first"]  # with both a spatial and a channel attention

    @field_validator("spsa")
    @classmethod
    def _spsa(cls, value: list[bool]) -> list[bool]:
        return _unique(value, "spsa")

    @field_validator("spatial")
    @classmethod
    def _spatial(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _known(value, SPATIAL_CHOICES, "spatial attention", "spatial")

    @field_validator("spsa_reverse")
    @classmethod
    def _reverse(cls, value: list[bool]) -> list[bool]:
        return _unique(value, "spsa_reverse")

    @field_validator("spsa_similarity")
    @classmethod
    def _similarity(cls, value: list[str]) -> list[str]:
        return _known(value, SIMILARITIES, "spsa_similarity", "spsa_similarity")

    @model_validator(mode="after")
    def _spsa_or_spatial(self) -> StageChoices:
        if self.spatial is None:
            return self
        if "spsa" in self.model_fields_set:
            raise SpaceProblem(("spatial",), "give either `spsa` (e.g. [false, true]) or `spatial` "
                                             f"(a subset of [{', '.join(SPATIAL_CHOICES)}]) in a "
                                             "stage, not both")
        # derived, not set: a stored space (dumped with exclude_unset) reloads the same
        object.__setattr__(self, "spsa", _spsa_states(self.spatial))
        return self

    @field_validator("heads")
    @classmethod
    def _heads(cls, value: list[int]) -> list[int]:
        for i, heads in enumerate(value):
            if heads < 1:
                raise SpaceProblem((i,), f"{heads} heads: must be a positive integer")
        return _unique(value, "heads")

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha_shape(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]  # a single number is a one-element set
        if not isinstance(value, list | tuple | dict | AlphaRange):
            raise SpaceProblem((), "alpha must be a list of values like [0.5, 1, 2] or a range "
                                    "{low: 0.5, high: 2, log: true}")
        return value

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, value: list[float] | AlphaRange) -> list[float] | AlphaRange:
        if isinstance(value, AlphaRange):
            return value
        for i, alpha in enumerate(value):
            if not (math.isfinite(alpha) and 0 < alpha <= MAX_ALPHA):
                raise SpaceProblem((i,), f"{alpha:g} is out of (0, {MAX_ALPHA:g}]")
        return _unique(value, "alpha")

    @field_validator("channel_attn")
    @classmethod
    def _attn(cls, value: list[str]) -> list[str]:
        return _known(value, CHANNEL_ATTENTIONS, "channel attention", "channel_attn")

    @field_validator("attn_order")
    @classmethod
    def _order(cls, value: list[str]) -> list[str]:
        return _known(value, ATTN_ORDERS, "attn_order", "attn_order")

    def alpha_values(self) -> list[float] | None:
        """The discrete alpha values, or None for a continuous range."""
        return self.alpha.values() if isinstance(self.alpha, AlphaRange) else list(self.alpha)

    def spatial_values(self) -> list[str]:
        """The spatial attentions the stage may take (from `spatial`, or from `spsa`)."""
        if self.spatial is not None:
            return list(self.spatial)
        return ["spsa" if on else "none" for on in self.spsa]

    def merged(self, override: StageChoices) -> StageChoices:
        """This template with the fields `override` sets explicitly replaced (`spsa` and `spatial`
        are one choice: an override giving either replaces the template's)."""
        update = {k: getattr(override, k) for k in override.model_fields_set}
        if "spatial" in update:
            update["spsa"] = override.spsa  # derived from the override's spatial
        elif "spsa" in update:
            update["spatial"] = None
        return self.model_copy(update=update)


@dataclass(frozen=True)
class ResolvedStage:
    """The choices of one stage of one backbone after the loader's decisions."""

    info: StageInfo
    feature_size: int
    choices: StageChoices


class SearchSpace(_Model):
    """A declarative search space over ArchSpecs (see docs/search.md for the format).

    `backbone` and `width` may be one value or a list to choose from. The stages are given as a
    template `all_stages` (applied to every stage of every backbone), a `stages` list (one entry
    per stage; all listed backbones must then have that many stages), or a `stages` mapping
    from 1-based stage number to overrides; entries of `stages` override the template field by
    field. A stage whose feature map is 1x1 at `input_size` has SPSA forced off (the gate would
    be a constant); `notes` says where.
    """

    name: str
    description: str = ""
    backbone: str | list[str]
    stem: str = "imagenet"
    input_size: int = Field(ge=8, le=4096)
    num_classes: int | None = Field(None, ge=2, le=100_000)  # None: from the dataset
    in_channels: int | None = Field(None, ge=1, le=64)  # None: from the dataset
    width: float | list[float] = 1.0
    all_stages: StageChoices | None = None
    stages: list[StageChoices] | dict[int, StageChoices] | None = None
    # Search strategies the space may be searched with (search_spaces.config.STRATEGIES). A oneshot
    # search trains one weight-sharing supernet per backbone and width of the space.
    strategies: list[str] = ["standalone", "oneshot"]
    # task detection: every candidate is a detector (one of `detector`, FPN of `fpn_channels`) around
    # the backbone, searched on a detection dataset (coco, shapes) with box AP as its accuracy
    task: str = "classification"
    detector: str | list[str] | None = None
    fpn_channels: int = Field(256, ge=8, le=1024)

    _resolved: dict[str, tuple[ResolvedStage, ...]] = PrivateAttr(default_factory=dict)
    _notes: list[str] = PrivateAttr(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise SpaceProblem((), f"{value!r}: 1-64 letters, digits, _ . -, starting with a letter or digit")
        return value

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        for i, name in enumerate(names):
            if name not in BACKBONES:
                raise SpaceProblem(() if isinstance(value, str) else (i,),
                                    f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
        if isinstance(value, list):
            _unique(value, "backbone")
        return value

    @model_validator(mode="before")
    @classmethod
    def _detection_is_standalone(cls, data: Any) -> Any:
        # the oneshot supernet trains classifiers: a detection space searches standalone by default
        if isinstance(data, dict) and data.get("task") == "detection" and "strategies" not in data:
            return {**data, "strategies": ["standalone"]}
        return data

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        if value not in ("classification", "detection"):
            raise SpaceProblem((), f"unknown task {value!r}; valid: classification, detection")
        return value

    @field_validator("detector")
    @classmethod
    def _detector(cls, value: str | list[str] | None) -> str | list[str] | None:
        names = [] if value is None else [value] if isinstance(value, str) else value
        for i, name in enumerate(names):
            if name not in DETECTORS:
                raise SpaceProblem(() if isinstance(value, str) else (i,),
                                   f"unknown detector {name!r}; valid: {', '.join(DETECTORS)}")
        if isinstance(value, list):
            _unique(value, "detector")
        return value

    @property
    def detectors(self) -> tuple[str, ...]:
        """The detectors to choose from (empty for a classification space)."""
        if self.detector is None:
            return ()
        return (self.detector,) if isinstance(self.detector, str) else tuple(self.detector)

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, value: list[str]) -> list[str]:
        for i, name in enumerate(value):
            if name not in ("standalone", "oneshot"):
                raise SpaceProblem((i,), f"unknown strategy {name!r}; valid: standalone, oneshot")
        return _unique(value, "strategies")

    @field_validator("stem")
    @classmethod
    def _stem(cls, value: str) -> str:
        if value not in STEMS:
            raise SpaceProblem((), f"unknown stem {value!r}; valid: {', '.join(STEMS)}")
        return value

    @field_validator("width")
    @classmethod
    def _width(cls, value: float | list[float]) -> float | list[float]:
        widths = [value] if isinstance(value, int | float) else value
        for i, width in enumerate(widths):
            if not (math.isfinite(width) and 0 < width <= 4):
                raise SpaceProblem(() if isinstance(value, int | float) else (i,),
                                    f"width {width:g} is out of (0, 4]")
        if isinstance(value, list):
            _unique(value, "width")
        return value

    @property
    def backbones(self) -> tuple[str, ...]:
        """The backbones to choose from."""
        return (self.backbone,) if isinstance(self.backbone, str) else tuple(self.backbone)

    @property
    def widths(self) -> tuple[float, ...]:
        """The width multipliers to choose from."""
        return (float(self.width),) if isinstance(self.width, int | float) else tuple(self.width)

    @property
    def notes(self) -> list[str]:
        """What the loader decided (stages where SPSA was switched off because the map is 1x1)."""
        return list(self._notes)

    def stage_choices(self, backbone: str) -> tuple[ResolvedStage, ...]:
        """The resolved choices of every stage of `backbone`."""
        if backbone not in self._resolved:
            raise ValueError(f"backbone {backbone!r} is not in space {self.name!r}; "
                             f"valid: {', '.join(self.backbones)}")
        return self._resolved[backbone]

    @model_validator(mode="after")
    def _resolve(self) -> SearchSpace:
        if self.all_stages is None and self.stages is None:
            raise SpaceProblem(("stages",), "give `all_stages` (a template for every stage), `stages` "
                                             "(a list with one entry per stage), or both")
        if self.task == "detection":
            if not self.detectors:
                raise SpaceProblem(("detector",), f"a detection space needs a detector; valid: "
                                                   f"{', '.join(DETECTORS)}")
            for i, backbone in enumerate(self.backbones):
                if backbone not in DETECTION_BACKBONES:
                    raise SpaceProblem(("backbone",) if isinstance(self.backbone, str) else ("backbone", i),
                                       f"{backbone} cannot carry a detector; valid: "
                                       f"{', '.join(DETECTION_BACKBONES)}")
            if "oneshot" in self.strategies:
                raise SpaceProblem(("strategies",), "a detection space is searched standalone (the "
                                                     "oneshot supernet trains classifiers)")
        elif self.detector is not None:
            raise SpaceProblem(("detector",), "only a space with task: detection has a detector")
        template = self.all_stages or StageChoices()
        notes: list[str] = []
        resolved: dict[str, tuple[ResolvedStage, ...]] = {}
        for backbone in self.backbones:
            table = stage_table(backbone)
            n = len(table)
            overrides: dict[int, tuple[Path_, StageChoices]] = {}
            if isinstance(self.stages, list):
                if len(self.stages) != n:
                    raise SpaceProblem(("stages",), f"{backbone} has {n} stages "
                                                     f"({', '.join(s.name for s in table)}), got "
                                                     f"{len(self.stages)} entries")
                overrides = {i: (("stages", i), c) for i, c in enumerate(self.stages)}
            elif isinstance(self.stages, dict):
                for number, choice in self.stages.items():
                    if not 1 <= number <= n:
                        raise SpaceProblem(("stages", number), f"stage {number} does not exist in "
                                                                f"{backbone}; valid: 1-{n}")
                    overrides[number - 1] = (("stages", number), choice)
            sizes = feature_sizes(backbone, self.stem, self.input_size)
            stages = []
            for i, info in enumerate(table):
                path, override = overrides.get(i, (("all_stages",), StageChoices()))
                choices = template.merged(override) if i in overrides else template
                if sizes[i] <= 1 and True in choices.spsa:
                    notes.append(f"{backbone} stage {i + 1} ({info.name}) is 1x1 at input_size "
                                 f"{self.input_size} with the {self.stem} stem: SPSA would be a "
                                 "constant gate there, so it is off in that stage")
                    if choices.spatial is None:
                        choices = choices.model_copy(update={"spsa": [False]})
                    else:
                        spatial = [a for a in choices.spatial if a != "spsa"] or ["none"]
                        choices = choices.model_copy(update={"spatial": spatial,
                                                             "spsa": _spsa_states(spatial)})
                heavy = [a for a in choices.spatial_values() if a not in ("none", "spsa")]
                if heavy and "oneshot" in self.strategies:
                    if "strategies" in self.model_fields_set:
                        raise SpaceProblem(("strategies",), f"strategy oneshot does not support spatial "
                                           f"attention {heavy[0]!r} ({backbone} stage {i + 1}): its "
                                           "weights are not shared in the supernet; list only "
                                           "standalone, or drop nonlocal/gc from the space")
                    # not asked for: such a space is searched standalone, as a detection space is
                    object.__setattr__(self, "strategies", ["standalone"])
                    notes.append(f"{backbone} stage {i + 1} ({info.name}) may take {heavy[0]!r}, which "
                                 "has weights the oneshot supernet does not share: the space is "
                                 "searched standalone only")
                if True in choices.spsa:
                    heads_path = path if "heads" in override.model_fields_set else ("all_stages",)
                    self._check_heads(backbone, i, choices.heads, (*heads_path, "heads"))
                stages.append(ResolvedStage(info=info, feature_size=sizes[i], choices=choices))
            resolved[backbone] = tuple(stages)
        self._resolved = resolved
        self._notes = notes
        return self

    def _check_heads(self, backbone: str, index: int, heads: list[int], path: Path_) -> None:
        for width in self.widths:
            info = stage_table(backbone, width)[index]
            valid = [h for h in range(1, info.channels // 2 + 1)
                     if info.channels % h == 0 and info.channels // h >= 2]
            for k, h in enumerate(heads):
                if h not in valid:
                    shown = ", ".join(map(str, valid[:16])) + (", ..." if len(valid) > 16 else "")
                    raise SpaceProblem((*path, k), f"{h} heads do not divide the {info.channels} channels "
                                                    f"of {backbone} stage {index + 1} ({info.name}) at "
                                                    f"width {width:g} into groups of >= 2; valid heads: "
                                                    f"{shown}")

    def size(self) -> int | None:
        """Number of distinct architectures, or None when a range of alpha is continuous."""
        total = 0
        for backbone in self.backbones:
            per_width = 1
            for stage in self.stage_choices(backbone):
                c = stage.choices
                n_attn = len(c.channel_attn)
                with_attn = n_attn - ("none" in c.channel_attn)
                orders = (("none" in c.channel_attn) + with_attn * len(c.attn_order))
                count = 0
                for spatial in c.spatial_values():
                    if spatial == "none":
                        count += n_attn
                    elif spatial == "spsa":
                        alphas = c.alpha_values()
                        if alphas is None:
                            return None
                        count += (len(c.heads) * len(alphas) * len(c.spsa_reverse)
                                  * len(c.spsa_similarity) * orders)
                    else:  # the non-local or GC block: no options of its own
                        count += orders
                per_width *= count
            total += per_width * len(self.widths)
        return total

    def summary(self) -> str:
        """One line: backbones, widths, input, stem."""
        widths = "/".join(f"{w:g}" for w in self.widths)
        head = f"{'/'.join(self.detectors)} on " if self.task == "detection" else ""
        return (f"{head}{'/'.join(self.backbones)} w{widths} {self.input_size}px {self.stem} stem")
