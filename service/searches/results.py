"""Read-only views of a search's Optuna study for the API: progress, trials, Pareto front, best."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from search_spaces.finalists import BestDecision, decide_best, remeasured_fields
from search_spaces.keys import ESTIMATE_ATTR, PHASE_ATTR, supernet_records
from search_spaces.study import estimated_metrics, finished, select_best, trial_counts
from service.api.schemas import BestSoFar, Progress, TrialPublic
from service.core.models import Search, utcnow
from service.core.redact import redact_paths
from service.core.settings import Settings
from service.searches.cache import StudyView

# Trial user attrs that are metrics (docs/CONTRACTS.md); the spec and weights are served apart.
METRIC_KEYS = (
    "val_acc",
    "top1",
    "top5",
    "latency_ms",
    "params",
    "flops",
    "feasible",
    "epochs",
    "train_seconds",
    "device",
    "val_curve",
    "latency",
    "reason",
    "error",
    "oneshot_estimate",  # oneshot: True when the accuracies come from the supernet's weights
    "retrain_of",  # oneshot: the candidate this trial retrained from scratch
    "oneshot_val_acc",  # ... and that candidate's estimates, beside this trial's real figures
    "oneshot_top1",
    "oneshot_val_loss",
    "val_loss",  # oneshot: a candidate's validation cross-entropy on the supernet's weights
    "oneshot_score",  # ... exp(-val_loss): what ranks it under oneshot.estimate "loss"
    "latency_ci_ms",  # the first pass's confidence interval of latency_ms, and its ratio to the reference
    "latency_ratio",
    "latency_ratio_ci",
    # detection (issue 14): val_acc is then the validation box AP; the test split's COCO metrics
    "task",
    "ap", "ap50", "ap75", "aps", "apm", "apl",
    "mask_ap", "mask_ap50", "mask_ap75", "mask_aps", "mask_apm", "mask_apl",
    "backbone_flops",
)


def _finite(values: list[float] | None) -> list[float] | None:
    if values is None:
        return None
    return [v if math.isfinite(v) else None for v in values]  # type: ignore[misc]


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) as None, in dicts, lists and tuples: valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def trial_metrics(trial: FrozenTrial, *, settings: Settings) -> dict[str, Any]:
    """The trial's metrics; `error` and `reason` without the server's paths (redact_paths)."""
    metrics = {key: json_safe(trial.user_attrs[key]) for key in METRIC_KEYS if key in trial.user_attrs}
    for key in ("error", "reason"):
        if isinstance(metrics.get(key), str):
            metrics[key] = redact_paths(metrics[key], settings)
    if trial.user_attrs.get(ESTIMATE_ATTR) is not None:
        metrics["estimated"] = estimated_metrics(trial.user_attrs)
    return metrics


def _optuna_time(value: datetime | None) -> datetime | None:
    """An Optuna timestamp in UTC: Optuna writes naive local times (the workers' zone; the
    service assumes its own)."""
    return value.astimezone(UTC) if value is not None else None


def remeasured_metrics(trial: FrozenTrial, record: dict[str, Any] | None) -> dict[str, Any]:
    """The trial's figures of the finalists' re-measurement together (`record`: the study attr
    FINALISTS_ATTR), as metrics beside the first-pass ones; {} when it was not one of them."""
    return json_safe(remeasured_fields(record, trial.number))  # type: ignore[no-any-return]


def trial_public(
    trial: FrozenTrial, *, settings: Settings, record: dict[str, Any] | None = None
) -> TrialPublic:
    """The API's view of a trial; with `record` (the finalists' re-measurement), its figures too."""
    duration = None
    if trial.datetime_start and trial.datetime_complete:
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
    spec = trial.user_attrs.get("spec")
    return TrialPublic(
        number=trial.number,
        state=trial.state.name,  # type: ignore[arg-type]
        values=_finite(trial.values),
        params=json_safe(dict(trial.params)),
        metrics={**trial_metrics(trial, settings=settings), **remeasured_metrics(trial, record)},
        spec=spec if isinstance(spec, dict) else None,
        has_weights=bool(trial.user_attrs.get("weights_artifact")),
        datetime_start=_optuna_time(trial.datetime_start),
        datetime_complete=_optuna_time(trial.datetime_complete),
        duration_s=duration,
    )


def best_decision(
    study: StudyView, *, latency_budget_ms: float | None, trial_number: int | None, accuracy_tolerance: float
) -> BestDecision | None:
    """search_spaces.finalists.decide_best (the pick and the candidates tied with it), or None."""
    try:
        return decide_best(study, latency_budget_ms=latency_budget_ms, trial_number=trial_number,
                           accuracy_tolerance=accuracy_tolerance)
    except LookupError:
        return None


def best_so_far(
    study: StudyView, *, latency_budget_ms: float | None = None, trial_number: int | None = None
) -> FrozenTrial | None:
    """search_spaces.select_best, or None when no trial qualifies."""
    try:
        return select_best(study, latency_budget_ms=latency_budget_ms, trial_number=trial_number)  # type: ignore[arg-type]
    except LookupError:
        return None


def _supernet_progress(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """oneshot: per supernet its epoch, epochs and training curve (no artifact ids); None when the
    study has no supernet."""
    records = supernet_records(attrs)
    if not records:
        return None
    keep = ("epoch", "epochs", "done", "curve", "workers")
    return {key: {k: json_safe(v) for k, v in record.items() if k in keep} for key, record in records.items()}


def progress(search: Search, study: StudyView | None, trials_requested: int) -> Progress:
    """Trial counts by state, the best trial so far and timings of a search."""
    # no study (not created yet, or gone): every count is 0
    counts: Mapping[str, int] = trial_counts(study) if study is not None else Counter()  # type: ignore[arg-type]
    durations = [
        (trial.datetime_complete - trial.datetime_start).total_seconds()
        for trial in (study.get_trials(deepcopy=False) if study is not None else [])
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and trial.datetime_start
        and trial.datetime_complete
    ]
    best = None
    if study is not None and counts["complete"]:
        chosen = best_so_far(study)
        if chosen is not None:
            best = BestSoFar(
                trial=chosen.number,
                values=_finite(chosen.values),
                val_acc=chosen.user_attrs.get("val_acc"),
                latency_ms=chosen.user_attrs.get("latency_ms"),
            )
    end: datetime = search.finished_at or utcnow()
    elapsed = (end - search.started_at).total_seconds() if search.started_at else None
    attrs = study.user_attrs if study is not None else {}
    return Progress(
        phase=attrs.get(PHASE_ATTR),
        supernet=_supernet_progress(attrs),
        trials_requested=trials_requested,
        finished=finished(counts),
        complete=counts["complete"],
        pruned=counts["pruned"],
        failed=counts["fail"],
        running=counts["running"],
        waiting=counts["waiting"],
        best=best,
        elapsed_s=elapsed,
        mean_trial_s=sum(durations) / len(durations) if durations else None,
    )
