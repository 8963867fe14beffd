"""suggest_arch: the one bridge from an Optuna trial to an ArchSpec (the only caller of suggest_*)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import optuna

from search_spaces.space import AlphaRange, SearchSpace
from spsa_nas.spec import ArchSpec, StageSpec

T = TypeVar("T", bool, int, float, str)


def _choose(trial: optuna.trial.BaseTrial, name: str, choices: Sequence[T]) -> T:
    """A categorical choice; a single-valued choice is fixed and not suggested at all."""
    if len(choices) == 1:
        return choices[0]
    return trial.suggest_categorical(name, list(choices))  # type: ignore[return-value]


def resolve_io(space: SearchSpace, *, num_classes: int | None, in_channels: int | None
               ) -> tuple[int, int]:
    """(num_classes, in_channels): the space's own values, else the dataset's; they must agree."""
    resolved = []
    for field, fixed, from_data in (("num_classes", space.num_classes, num_classes),
                                    ("in_channels", space.in_channels, in_channels)):
        if fixed is not None and from_data is not None and fixed != from_data:
            raise ValueError(f"space {space.name!r} fixes {field}={fixed} but the dataset has "
                             f"{from_data}; remove {field} from the space or use matching data")
        value = fixed if fixed is not None else from_data
        if value is None:
            raise ValueError(f"space {space.name!r} leaves {field} to the dataset: pass {field}=")
        resolved.append(value)
    return resolved[0], resolved[1]


def suggest_arch(trial: optuna.trial.BaseTrial, space: SearchSpace, *, num_classes: int | None = None,
                 in_channels: int | None = None) -> ArchSpec:
    """Suggest one architecture of `space`.

    Parameter names: `backbone`, `width` (only when there is a choice), then per stage n (1-based)
    `sN.spsa` — or `sN.spatial` (none, spsa, nonlocal, gc) where the space lists `spatial` —,
    `sN.channel_attn`, and only when SPSA is on `sN.heads`, `sN.alpha`, `sN.reverse` and
    `sN.similarity`, and `sN.attn_order` only when a channel attention is also present beside a
    spatial one (SPSA, or the non-local or GC block). Every one is suggested only where the space
    gives more than one value. `num_classes`/`in_channels` are the dataset's, used where the space
    leaves them open.
    """
    classes, channels = resolve_io(space, num_classes=num_classes, in_channels=in_channels)
    backbone = _choose(trial, "backbone", space.backbones)
    width = _choose(trial, "width", space.widths)
    stages = []
    for number, stage in enumerate(space.stage_choices(backbone), start=1):
        choices = stage.choices
        prefix = f"s{number}."
        if choices.spatial is None:  # the original parameter: stored studies resume unchanged
            spsa = _choose(trial, prefix + "spsa", choices.spsa)
            spatial_attn = "none"
        else:
            spatial = _choose(trial, prefix + "spatial", choices.spatial)
            spsa = spatial == "spsa"
            spatial_attn = "none" if spatial in ("none", "spsa") else spatial
        attn = _choose(trial, prefix + "channel_attn", choices.channel_attn)
        heads, alpha, order, reverse, similarity = 1, 1.0, "channel_first", True, "correlation"
        if spsa:
            heads = _choose(trial, prefix + "heads", choices.heads)
            if isinstance(choices.alpha, AlphaRange):
                r = choices.alpha
                alpha = trial.suggest_float(prefix + "alpha", r.low, r.high, log=r.log, step=r.step)
            else:
                alpha = float(_choose(trial, prefix + "alpha", [float(a) for a in choices.alpha]))
            reverse = _choose(trial, prefix + "reverse", choices.spsa_reverse)
            similarity = _choose(trial, prefix + "similarity", choices.spsa_similarity)
        if (spsa or spatial_attn != "none") and attn != "none":
            order = _choose(trial, prefix + "attn_order", choices.attn_order)
        stages.append(StageSpec(spsa=spsa, spsa_heads=heads, spsa_alpha=alpha, channel_attn=attn,
                                attn_order=order, spsa_reverse=reverse,  # type: ignore[arg-type]
                                spsa_similarity=similarity, spatial_attn=spatial_attn))
    detection: dict[str, object] = {}
    if space.task == "detection":  # the detector is chosen among the space's, like the backbone
        detector = {"name": _choose(trial, "detector", space.detectors), "fpn_channels": space.fpn_channels}
        detection = {"task": "detection", "detector": detector}
    return ArchSpec(backbone=backbone, num_classes=classes, in_channels=channels,  # type: ignore[arg-type]
                    stem=space.stem, input_size=space.input_size, width=width, stages=stages, **detection)
