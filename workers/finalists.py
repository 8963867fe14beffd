"""A search's finalists at its end: their latencies re-measured together, interleaved with the space's
reference (`spsa-nas remeasure`), and the top-k re-trained with more seeds (`spsa-nas reseed`)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial

from search_spaces.finalists import (
    ACCURACY_TOLERANCE,
    MAX_FINALISTS,
    NOTE_MARK,
    SEEDS_ATTR,
    anchor_ms,
    finalist_trials,
    finalists_note,
    normalized,
    remeasurement_record,
    seeds_record,
)
from search_spaces.keys import ESTIMATE_ATTR, FINALISTS_ATTR, LATENCY_KEY_ATTR, PHASE_ATTR
from search_spaces.study import study_config

if TYPE_CHECKING:
    from search_spaces.config import SearchConfig
    from spsa_nas.evaluate import EvalHooks

logger = logging.getLogger(__name__)


def _write_note(study: optuna.Study, body: str) -> bool:
    """Show `body` as the study's note in optuna-dashboard, unless a person wrote the note there
    (it is then left alone). True when written."""
    try:
        from optuna_dashboard import save_note
        from optuna_dashboard._note import get_note_from_system_attrs
    except ImportError:  # optuna-dashboard is a dependency; an install without it shows no note
        return False
    system_attrs = study._storage.get_study_system_attrs(study._study_id)  # where the dashboard keeps notes
    current = get_note_from_system_attrs(system_attrs, None).get("body", "")
    if current and not current.startswith(NOTE_MARK):
        logger.info("study %s has a note of its own: the finalists are not written into it", study.study_name)
        return False
    save_note(study, body)
    return True


def remeasure_finalists(
    study: optuna.Study,
    *,
    device: str | None = None,
    latency_lock: Callable[[], AbstractContextManager[None]] | None = None,
    accuracy_tolerance: float = ACCURACY_TOLERANCE,
    max_count: int = MAX_FINALISTS,
) -> dict[str, Any] | None:
    """Measure the study's finalists (search_spaces.finalists.finalist_trials) again, side by side.

    One spsa_nas.latency.measure_group per input shape (the finalists of a space share one), the
    space's reference interleaved, under `latency_lock()` (the host to itself); the search's
    latency config with the interleaved protocol (intervals are the point). Each figure is also
    put on the scale of the trials' `latency_ms` (`figure_ms`, `figure_ci_ms`: the ratio to the
    reference times the study's anchor, search_spaces.finalists.anchor_ms). The result is stored
    as the study attr FINALISTS_ATTR (remeasurement_record) and shown as the study's note in
    optuna-dashboard; the trials' first-pass figures are left as they are. Returns the record,
    or None when the study has no finalist (no complete trial with a spec).
    """
    import torch

    from spsa_nas import build_model
    from spsa_nas.latency import REFERENCE, measure_group, reference_model, resolve_device
    from spsa_nas.spec import ArchSpec

    cfg = study_config(study)
    trials = finalist_trials(study, accuracy_tolerance=accuracy_tolerance, max_count=max_count)
    if not trials:
        return None
    latency = cfg.latency.model_copy(update={"protocol": "interleaved"})
    dev = resolve_device(device or cfg.device)
    groups: dict[tuple[int, int], dict[str, ArchSpec]] = {}
    for trial in trials:
        spec = ArchSpec.model_validate(trial.user_attrs["spec"])
        groups.setdefault((spec.in_channels, spec.input_size), {})[str(trial.number)] = spec
    results: dict[int, dict[str, Any]] = {}
    reference: dict[str, Any] | None = None
    lock = latency_lock() if latency_lock is not None else contextlib.nullcontext()
    with lock:
        for (channels, size), specs in groups.items():
            with torch.random.fork_rng(devices=[]):
                models = {name: build_model(spec) for name, spec in specs.items()}
            ref = reference_model(next(iter(specs.values())), latency)
            measured = measure_group(models, (channels, size, size), latency, dev,
                                     reference=ref[0] if ref else None,
                                     reference_name=ref[1] if ref else None)
            for name in specs:
                figure = measured[name].to_dict()
                ms, interval = normalized(figure, anchor_ms(study, figure))  # on latency_ms's scale
                results[int(name)] = {**figure, "figure_ms": ms, "figure_ci_ms": interval}
            if ref is not None and reference is None:
                r = measured[REFERENCE]
                reference = {"name": ref[1], "median_ms": r.median_ms, "ci_low_ms": r.ci_low_ms,
                             "ci_high_ms": r.ci_high_ms}
    record = remeasurement_record(results, device=str(dev), reference=reference)
    study.set_user_attr(FINALISTS_ATTR, record)
    _write_note(study, finalists_note(record, trials))
    return record


class TrialLatency:
    """A read-only latency cache holding one trial's measurement (its `latency` attr under its
    `latency_key`): a re-training with another seed reuses it instead of measuring again. It
    pickles (plain dicts), so a Ray task can take it."""

    def __init__(self, key: str | None, latency: dict[str, Any] | None) -> None:
        self._key, self._latency = key, dict(latency) if isinstance(latency, dict) else None

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialLatency:
        return cls(trial.user_attrs.get(LATENCY_KEY_ATTR), trial.user_attrs.get("latency"))

    def get(self, key: str) -> dict[str, Any] | None:
        return dict(self._latency) if self._latency is not None and key == self._key else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Nothing is stored: the study's trials hold the measurements."""


def check_reseed(top_k: int, seeds: int) -> None:
    """ValueError unless top_k >= 1 and seeds >= 2."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if seeds < 2:
        raise ValueError(f"seeds must be at least 2 (the trial's own run is one), got {seeds}")


def reseed_candidates(study: optuna.Study, top_k: int) -> list[FrozenTrial]:
    """The `top_k` complete trials to re-train with more seeds, in select_best's order (the highest
    validation accuracy, then the lower first-pass latency, then the number); only trials with a
    spec, neither oneshot estimates nor detectors (their accuracy is not a trained one)."""
    candidates = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                  if isinstance(t.user_attrs.get("spec"), dict) and t.user_attrs.get("val_acc") is not None
                  and not t.user_attrs.get(ESTIMATE_ATTR)
                  and t.user_attrs["spec"].get("task", "classification") != "detection"]
    return sorted(candidates, key=lambda t: (-t.user_attrs["val_acc"], t.user_attrs.get("latency_ms") or 0.0,
                                             t.number))[:top_k]


def retrain_seed(cfg: SearchConfig, spec: dict[str, Any], seed: int, *, device: str,
                 hooks: EvalHooks) -> float:
    """One re-training of a trial's architecture `spec` with training seed `seed` through the trial's
    evaluation (spsa_nas.evaluate.evaluate_spec: the search's data, training and latency settings;
    `hooks.latency_cache` gives the trial's measurement); its validation accuracy. Cancelled when
    `hooks.should_stop()` says so."""
    from spsa_nas.evaluate import evaluate_spec
    from spsa_nas.spec import ArchSpec

    result = evaluate_spec(ArchSpec.model_validate(spec), data=cfg.dataset,
                           train=cfg.train.model_copy(update={"seed": seed}), latency=cfg.latency,
                           device=device, hooks=hooks)
    return float(result.metrics()["val_acc"])


@contextlib.contextmanager
def reseed_phase(study: optuna.Study) -> Iterator[None]:
    """The study's phase (PHASE_ATTR, the API's progress.phase) reads "reseed" while the top-k are
    re-trained, then what it was before (None for a standalone search, "done" for a oneshot one)."""
    before = study.user_attrs.get(PHASE_ATTR)
    study.set_user_attr(PHASE_ATTR, "reseed")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # e.g. the storage went away: the run's outcome stands
            study.set_user_attr(PHASE_ATTR, before)


def reseed_top_k(study: optuna.Study, *, top_k: int = 3, seeds: int = 2, device: str | None = None,
                 should_stop: Callable[[], bool] | None = None, deadline: float | None = None,
                 latency_lock: Callable[[], AbstractContextManager[None]] | None = None,
                 ) -> dict[str, Any] | None:
    """Re-train the `top_k` complete trials by validation accuracy (reseed_candidates) with more
    training seeds, here, so that `best` can tell their accuracy noise
    (search_spaces.finalists.accuracy_interval).

    Each trial's architecture is trained again (retrain_seed) with `train.seed` = the search's
    seed + 1 ... + `seeds` - 1 (the trial's own run is the first seed); the latency is the trial's
    stored measurement. The result is the study attr SEEDS_ATTR (search_spaces.finalists.seeds_record),
    written after each trial and at the end: per trial re-trained its validation accuracy by seed,
    mean and std; the trials themselves are left as they are. `should_stop()` (polled each training
    step) stops it with `stopped: "cancelled"`, `deadline` (unix time) with `stopped: "timeout"`;
    what was re-trained before is kept. An error is recorded (`error`) and raised. Returns the
    record, or None when no trial qualifies. ValueError for top_k < 1 or seeds < 2.
    """
    from spsa_nas.evaluate import Cancelled, EvalHooks

    check_reseed(top_k, seeds)
    cfg = study_config(study)
    top = reseed_candidates(study, top_k)
    if not top:
        return None
    base = cfg.train.seed
    by_trial = {t.number: {base: float(t.user_attrs["val_acc"])} for t in top}
    planned = [t.number for t in top]

    def over_time() -> bool:
        return deadline is not None and time.time() >= deadline

    def stop() -> bool:
        return over_time() or (should_stop is not None and should_stop())

    def record(stopped: str | None = None, error: str | None = None) -> dict[str, Any]:
        out = seeds_record(by_trial, seeds=seeds, top_k=top_k, planned=planned, stopped=stopped, error=error)
        study.set_user_attr(SEEDS_ATTR, out)
        return out

    stopped = None
    try:
        for trial in top:
            hooks = EvalHooks(latency_cache=TrialLatency.of(trial), should_stop=stop,
                              latency_lock=latency_lock)
            for extra in range(1, seeds):
                if stop():
                    raise Cancelled("stopped before training")
                by_trial[trial.number][base + extra] = retrain_seed(
                    cfg, trial.user_attrs["spec"], base + extra, device=device or cfg.device, hooks=hooks)
            logger.info("search %s: trial %s re-trained with %d seeds: %s", study.study_name, trial.number,
                        seeds, by_trial[trial.number])
            record()  # progress: what is re-trained so far shows (best, the API) before the end
    except Cancelled:
        stopped = "timeout" if over_time() else "cancelled"
        logger.warning("search %s: re-training the top %d with %d seeds stopped (%s)", study.study_name,
                       top_k, seeds, stopped)
    except Exception as exc:
        with contextlib.suppress(Exception):
            record(error=f"{type(exc).__name__}: {exc}")
        raise
    return record(stopped=stopped)


def record_failure(study: optuna.Study, device: str, error: str) -> None:
    """Record a re-measurement that failed (the study attr says why; the note too)."""
    record = remeasurement_record({}, device=device, reference=None, error=error[:2000])
    study.set_user_attr(FINALISTS_ATTR, record)
    _write_note(study, finalists_note(record, []))


def remeasure_task(storage_url: str, study_name: str, *, device: str, lock_dir: str | None,
                   pause_training: bool) -> dict[str, Any] | None:
    """The body of the Ray task that re-measures a study's finalists on a worker (at the end of a
    run, and on demand): under the host's latency gate; a failure is recorded in the study (the
    study attr's `error`) and raised. `device` "auto": the worker's GPU when Ray gave it one."""
    from search_spaces.storage import open_storage
    from workers.latency_gate import NodeGate
    from workers.ray_device import task_device

    device = task_device(device)
    storage = open_storage(storage_url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        gate = NodeGate(lock_dir, pause_training=pause_training)
        try:
            return remeasure_finalists(study, device=device, latency_lock=gate.latency_lock)
        except Exception as exc:
            record_failure(study, device, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            gate.close()
    finally:
        storage.close()


def remeasure_on_ray(
    study_name: str,
    storage_url: str,
    *,
    options: Any = None,
    should_stop: Callable[[], bool] | None = None,
    poll_s: float = 1.0,
) -> dict[str, Any] | None:
    """Re-measure a finished study's finalists on demand, as a run does at its end: one Ray task with
    a trial's resources of the study's config (workers.ray_runner.RunnerOptions `options`: lock dir,
    memory, custom resources), on a Ray the caller connected. `should_stop()`, polled every `poll_s`,
    cancels the task (None is returned then). Returns the record (FINALISTS_ATTR), or None when the
    study has no finalist; the task's error is raised (and recorded in the study)."""
    import ray

    from search_spaces.finalists import finalist_trials
    from workers.ray_runner import RunnerOptions

    options = options or RunnerOptions()
    storage = None
    try:
        from search_spaces.storage import open_storage

        storage = open_storage(storage_url)
        study = optuna.load_study(study_name=study_name, storage=storage)
        if not finalist_trials(study):
            return None
        cfg = study_config(study)
    finally:
        if storage is not None:
            storage.close()
    resources = cfg.resources
    ref = ray.remote(remeasure_task).options(
        num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
        memory=options.memory_limit(resources), resources=dict(options.resources) or None,
        max_retries=0, retry_exceptions=False, name=f"spsa-nas-remeasure:{study_name}",
    ).remote(storage_url, study_name, device=cfg.device, lock_dir=options.lock_dir,
             pause_training=options.pause_training_during_latency)
    while not ray.wait([ref], timeout=poll_s)[0]:
        if should_stop is not None and should_stop():
            ray.cancel(ref, force=True)
            return None
    return ray.get(ref)  # type: ignore[no-any-return]


__all__ = [
    "TrialLatency",
    "check_reseed",
    "record_failure",
    "remeasure_finalists",
    "remeasure_on_ray",
    "remeasure_task",
    "reseed_candidates",
    "reseed_phase",
    "reseed_top_k",
    "retrain_seed",
]
