"""Re-measure a search's finalists together: their latencies side by side, interleaved with the space's
reference, in one process (at the end of a run, and `spsa-nas remeasure`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import optuna

from search_spaces.finalists import (
    ACCURACY_TOLERANCE,
    MAX_FINALISTS,
    NOTE_MARK,
    anchor_ms,
    finalist_trials,
    finalists_note,
    normalized,
    remeasurement_record,
)
from search_spaces.keys import FINALISTS_ATTR
from search_spaces.study import study_config

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
    import ray

    from search_spaces.storage import open_storage
    from workers.latency_gate import NodeGate

    if device == "auto":
        device = "cuda" if ray.get_gpu_ids() else "cpu"
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


__all__ = ["record_failure", "remeasure_finalists", "remeasure_on_ray", "remeasure_task"]
