"""Read-only views of a search's Optuna study for the API: progress, trials, Pareto front, best."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Container
from datetime import datetime
from typing import Any

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from search_spaces.study import select_best
from service.models import Search, utcnow
from service.redact import redact_paths
from service.schemas import BestSoFar, Progress, TrialPublic
from service.settings import Settings

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
)


class StudyView:
    """A read-only snapshot of a study: what search_spaces.study's pareto_front and select_best
    read (study_name, user_attrs, get_trials), loaded once per request or reused from the cache."""

    def __init__(
        self, study_name: str, study_id: int, user_attrs: dict[str, Any], trials: list[FrozenTrial]
    ) -> None:
        self.study_name = study_name
        self._study_id = study_id
        self.user_attrs = user_attrs
        self._trials = trials

    @property
    def trials(self) -> list[FrozenTrial]:
        return self._trials

    def get_trials(
        self, deepcopy: bool = False, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        if states is None:
            return list(self._trials)
        return [t for t in self._trials if t.state in states]


class StudyCache:
    """Study ids (they never change) and study snapshots for `ttl_s` seconds, or for good once
    the search has ended: under load, repeated reads of a running search cost one storage read
    per `ttl_s`, not one per request."""

    def __init__(self, storage: BaseStorage, ttl_s: float) -> None:
        self.storage = storage
        self.ttl_s = ttl_s
        self._ids: dict[str, int] = {}
        self._views: dict[str, tuple[float, bool, StudyView]] = {}
        self._reloading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def study_id(self, study_name: str) -> int | None:
        if study_name in self._ids:
            return self._ids[study_name]
        try:
            study_id = self.storage.get_study_id_from_name(study_name)
        except KeyError:
            return None
        with self._lock:
            self._ids[study_name] = study_id
        return study_id

    def view(self, study_name: str, *, final: bool = False) -> StudyView | None:
        """The study's snapshot (None when it does not exist); `final`: the search has ended.

        One thread at a time reloads a study: while it does, the others answer from the previous
        snapshot (at most ttl_s plus one reload old) instead of all reloading at once when the
        snapshot expires under load.
        """
        cached = self._fresh(study_name)
        if cached is not None and cached[0]:
            return cached[1]
        with self._lock:
            reloading = self._reloading.setdefault(study_name, threading.Lock())
        if not reloading.acquire(blocking=cached is None):
            return cached[1]  # type: ignore[index]
        try:
            again = self._fresh(study_name)  # another thread may have reloaded it meanwhile
            if again is not None and again[0]:
                return again[1]
            return self._load(study_name, final)
        finally:
            reloading.release()

    def _fresh(self, study_name: str) -> tuple[bool, StudyView] | None:
        """(still fresh?, the cached snapshot), or None when nothing is cached."""
        cached = self._views.get(study_name)
        if cached is None:
            return None
        return cached[1] or time.monotonic() - cached[0] < self.ttl_s, cached[2]

    def _load(self, study_name: str, final: bool) -> StudyView | None:
        now = time.monotonic()
        study_id = self.study_id(study_name)
        if study_id is None:
            return None
        view = StudyView(
            study_name,
            study_id,
            self.storage.get_study_user_attrs(study_id),
            self.storage.get_all_trials(study_id, deepcopy=False),
        )
        with self._lock:
            self._views[study_name] = (now, final, view)
            if len(self._views) > 1024:  # keep the most recent
                for name in sorted(self._views, key=lambda n: self._views[n][0])[:256]:
                    del self._views[name]
                    self._reloading.pop(name, None)
        return view

    def forget(self, study_name: str) -> None:
        with self._lock:
            self._views.pop(study_name, None)


def _finite(values: list[float] | None) -> list[float] | None:
    if values is None:
        return None
    return [v if math.isfinite(v) else None for v in values]  # type: ignore[misc]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def trial_metrics(trial: FrozenTrial, *, settings: Settings) -> dict[str, Any]:
    """The trial's metrics; `error` and `reason` without the server's paths (redact_paths)."""
    metrics = {key: _json_safe(trial.user_attrs[key]) for key in METRIC_KEYS if key in trial.user_attrs}
    for key in ("error", "reason"):
        if isinstance(metrics.get(key), str):
            metrics[key] = redact_paths(metrics[key], settings)
    return metrics


def trial_public(trial: FrozenTrial, *, settings: Settings) -> TrialPublic:
    duration = None
    if trial.datetime_start and trial.datetime_complete:
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
    spec = trial.user_attrs.get("spec")
    return TrialPublic(
        number=trial.number,
        state=trial.state.name,  # type: ignore[arg-type]
        values=_finite(trial.values),
        params=_json_safe(dict(trial.params)),
        metrics=trial_metrics(trial, settings=settings),
        spec=spec if isinstance(spec, dict) else None,
        has_weights=bool(trial.user_attrs.get("weights_artifact")),
        datetime_start=trial.datetime_start,
        datetime_complete=trial.datetime_complete,
        duration_s=duration,
    )


def best_so_far(
    study: StudyView, *, latency_budget_ms: float | None = None, trial_number: int | None = None
) -> FrozenTrial | None:
    """search_spaces.select_best, or None when no trial qualifies."""
    try:
        return select_best(study, latency_budget_ms=latency_budget_ms, trial_number=trial_number)  # type: ignore[arg-type]
    except LookupError:
        return None


def progress(search: Search, study: StudyView | None, trials_requested: int) -> Progress:
    trials = study.get_trials(deepcopy=False) if study is not None else []
    counts = {state: 0 for state in TrialState}
    durations = []
    for trial in trials:
        counts[trial.state] += 1
        if (
            trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and trial.datetime_start
            and trial.datetime_complete
        ):
            durations.append((trial.datetime_complete - trial.datetime_start).total_seconds())
    best = None
    if study is not None and counts[TrialState.COMPLETE]:
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
    return Progress(
        trials_requested=trials_requested,
        finished=counts[TrialState.COMPLETE] + counts[TrialState.PRUNED],
        complete=counts[TrialState.COMPLETE],
        pruned=counts[TrialState.PRUNED],
        failed=counts[TrialState.FAIL],
        running=counts[TrialState.RUNNING],
        waiting=counts[TrialState.WAITING],
        best=best,
        elapsed_s=elapsed,
        mean_trial_s=sum(durations) / len(durations) if durations else None,
    )
