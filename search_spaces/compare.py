"""A search's ablation table: completed trials grouped by their architecture's choices (spatial attention,
SPSA's reverse and similarity, channel attention), per stage and over all stages, with n, accuracy and
latency per cell (`spsa-nas compare`, GET /api/v1/searches/{id}/compare; docs/service.md)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from search_spaces.finalists import StudyLike, latency_figure, remeasurement

#: The choice dimensions, in the order of the table, with their titles.
DIMENSIONS: dict[str, str] = {
    "spatial_attn": "spatial attention",
    "spsa_reverse": "SPSA reverse (among SPSA stages)",
    "spsa_similarity": "SPSA similarity (among SPSA stages)",
    "channel_attn": "channel attention",
}
#: Scopes besides the per-stage ones ("stage 1", "stage 2", ...).
ANY_STAGE = "any stage"
EVERY_STAGE = "every stage"

COUNTING = (
    "A cell counts completed trials (COMPLETE, with a spec and a validation accuracy). 'stage k': "
    "the trial counts in the cell of the choice its stage k has. 'any stage': the trial counts once "
    "in the cell of every choice at least one of its stages has, so a trial with mixed choices is in "
    "several cells of that row and the row's n add up to more than the trials. 'every stage': the "
    "trial counts only when all its stages the dimension applies to have that one choice (a mixed "
    "trial is in no cell of that row). Reverse and similarity apply only to stages with SPSA: a stage "
    "without SPSA is in no cell of theirs, and a trial with no SPSA stage in no cell at all."
)
LATENCY_NOTE = (
    "latency_ms: the latency figure that counts for each trial, as `best` uses it: its re-measured "
    "figure when it was a finalist re-measured together (n_remeasured of the cell), else its first-pass "
    "figure (ratio to the reference x the study's anchor); latency_first_pass_ms: the first-pass "
    "figure of every trial of the cell."
)


def stage_choices(stage: dict[str, Any]) -> dict[str, str | None]:
    """One stage's choice in every dimension (None: the dimension does not apply to it). Stages
    stored before a field existed read its default (reverse on, correlation, no spatial_attn)."""
    spatial = str(stage.get("spatial_attn") or "none")
    spsa = bool(stage.get("spsa"))
    if spsa:
        spatial = "spsa" if spatial == "none" else f"spsa+{spatial}"
    return {
        "spatial_attn": spatial,
        "spsa_reverse": ("on" if stage.get("spsa_reverse", True) else "off") if spsa else None,
        "spsa_similarity": str(stage.get("spsa_similarity") or "correlation") if spsa else None,
        "channel_attn": str(stage.get("channel_attn") or "none"),
    }


@dataclass
class _Cell:
    dimension: str
    scope: str
    choice: str
    trials: list[FrozenTrial] = field(default_factory=list)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) >= 2 else None


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _summary(cell: _Cell, record: dict[str, Any] | None) -> dict[str, Any]:
    acc = [v for t in cell.trials if (v := _finite(t.user_attrs.get("val_acc"))) is not None]
    top1 = [v for t in cell.trials if (v := _finite(t.user_attrs.get("top1"))) is not None]
    first = [v for t in cell.trials if (v := _finite(t.user_attrs.get("latency_ms"))) is not None]
    figures = [f for t in cell.trials if (f := latency_figure(t, record)) is not None]
    latency = [f.ms for f in figures]
    acc_std = _std(acc)
    return {
        "dimension": cell.dimension,
        "scope": cell.scope,
        "choice": cell.choice,
        "n": len(cell.trials),
        "trials": sorted(t.number for t in cell.trials),
        "val_acc_mean": _mean(acc),
        "val_acc_std": acc_std,
        # the standard error of the mean: mean ± 2 sem is a rough 95 % interval for n of 5 and more
        "val_acc_sem": acc_std / math.sqrt(len(acc)) if acc_std is not None else None,
        "val_acc_min": min(acc) if acc else None,
        "val_acc_max": max(acc) if acc else None,
        "top1_mean": _mean(top1),
        "latency_ms_mean": _mean(latency),
        "latency_ms_std": _std(latency),
        "latency_first_pass_ms_mean": _mean(first),
        "n_remeasured": sum(1 for f in figures if f.source == "remeasured"),
    }


def _usable(trial: FrozenTrial) -> bool:
    spec = trial.user_attrs.get("spec")
    return (isinstance(spec, dict) and isinstance(spec.get("stages"), list | tuple)
            and _finite(trial.user_attrs.get("val_acc")) is not None)


def _group(trials: Iterable[FrozenTrial]) -> list[_Cell]:
    cells: dict[tuple[str, str, str], _Cell] = {}

    def add(dimension: str, scope: str, choice: str, trial: FrozenTrial) -> None:
        key = (dimension, scope, choice)
        cells.setdefault(key, _Cell(dimension, scope, choice)).trials.append(trial)

    for trial in trials:
        stages = [stage_choices(s if isinstance(s, dict) else {}) for s in trial.user_attrs["spec"]["stages"]]
        for dimension in DIMENSIONS:
            seen = [c[dimension] for c in stages]
            for index, choice in enumerate(seen, start=1):
                if choice is not None:
                    add(dimension, f"stage {index}", choice, trial)
            applicable = [c for c in seen if c is not None]
            for choice in dict.fromkeys(applicable):  # once per choice, in stage order
                add(dimension, ANY_STAGE, choice, trial)
            if applicable and len(set(applicable)) == 1:
                add(dimension, EVERY_STAGE, applicable[0], trial)

    def order(cell: _Cell) -> tuple[int, int, str]:
        if cell.scope.startswith("stage "):
            scope = int(cell.scope.split()[1])
        else:
            scope = 10_000 + (cell.scope == EVERY_STAGE)
        return (list(DIMENSIONS).index(cell.dimension), scope, cell.choice)

    return sorted(cells.values(), key=order)


def compare_study(study: StudyLike) -> dict[str, Any]:
    """The ablation table of a study (optuna.Study or the service's StudyView): its completed trials
    grouped by choice (COUNTING says how), each cell with n, the trials' numbers, the mean, std,
    standard error, min and max validation accuracy, the mean test top-1, the mean latency figure
    (LATENCY_NOTE) and the mean first-pass latency. Trials not summarised are counted apart: pruned,
    failed, running, waiting, and complete ones without a spec or validation accuracy. A running
    study is summarised as far as it got (its trials completed so far)."""
    all_trials = study.get_trials(deepcopy=False)
    counts = dict.fromkeys(("complete", "pruned", "fail", "running", "waiting"), 0)
    for trial in all_trials:
        counts[trial.state.name.lower()] += 1
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    usable = [t for t in complete if _usable(t)]
    record = remeasurement(study)
    detection = any((t.user_attrs.get("spec") or {}).get("task") == "detection" for t in usable)
    return {
        "study": study.study_name,
        "accuracy": "validation box AP" if detection else "validation accuracy",
        "counts": {
            "summarised": len(usable),
            "complete_without_metrics": len(complete) - len(usable),
            **{k: v for k, v in counts.items() if k != "complete"},
        },
        "estimated": sum(1 for t in usable if t.user_attrs.get("oneshot_estimate")),
        "remeasured_at": (record or {}).get("at") if (record or {}).get("trials") else None,
        "counting": COUNTING,
        "latency": LATENCY_NOTE,
        "dimensions": dict(DIMENSIONS),
        "cells": [_summary(cell, record) for cell in _group(usable)],
    }


__all__ = [
    "ANY_STAGE",
    "COUNTING",
    "DIMENSIONS",
    "EVERY_STAGE",
    "LATENCY_NOTE",
    "compare_study",
    "stage_choices",
]
