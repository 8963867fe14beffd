"""run_local: the in-process search loop (no Ray), resumable across interrupted runs."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from search_spaces.config import ReseedConfig
from search_spaces.keys import ERROR_ATTR, RUNNER_ATTR
from search_spaces.run import Outcome, RunReport
from search_spaces.storage import open_storage
from search_spaces.study import finished, load_study, study_config, study_space, trial_counts
from spsa_nas.errors import format_validation_error
from spsa_nas.evaluate import Cancelled, EvalHooks
from workers.oneshot import OneshotPhases, run_oneshot_trial
from workers.trial import run_trial

MAX_CONSECUTIVE_FAILURES = 3  # then stop: the same error would repeat for every trial

logger = logging.getLogger(__name__)


class StopEvent(Protocol):
    """Anything with `is_set()` (threading.Event, multiprocessing.Event)."""

    def is_set(self) -> bool: ...


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale_local_trials(study: optuna.Study) -> list[int]:
    """Tell FAIL to RUNNING trials left by a local loop on this host whose process is gone.

    Only trials marked by this loop (user attr `runner.kind == "local"`) on this host are
    touched; trials of a Ray runner, or of a live local process, are left alone.
    """
    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        runner = trial.user_attrs.get(RUNNER_ATTR)
        if not isinstance(runner, dict) or runner.get("kind") != "local" or runner.get("host") != host:
            continue
        pid = int(runner.get("pid", -1))
        if pid == os.getpid() or not _pid_alive(pid):
            study._storage.set_trial_user_attr(trial._trial_id, ERROR_ATTR, "interrupted (the local run "
                                               "that ran it stopped; failed on resume)")
            study.tell(trial.number, state=TrialState.FAIL)
            failed.append(trial.number)
    return failed


def run_local(study_name: str, storage_url: str, *, artifact_dir: str | Path,
              stop_event: StopEvent | None = None,
              progress: Callable[[optuna.Study, FrozenTrial], None] | None = None,
              device: str | None = None, remeasure_finalists: bool = True,
              reseed_top_k: int | None = None, reseed_seeds: int | None = None) -> RunReport:
    """Run the search of the study `study_name` in this process until its config's `trials` trials
    are finished (complete or pruned).

    The study must exist (search_spaces.study.create_study); its config and space are read from
    it once. Trials left RUNNING by an earlier local run that died are told FAIL first. Stops
    early on the config's `timeout_s` (of this run), on `stop_event` (outcome "cancelled"; the
    running trial is told FAIL "cancelled"), or after 3 failures in a row (outcome "failing").
    `progress(study, trial)` is called after each trial. KeyboardInterrupt: the running trial is
    told FAIL and the exception propagates; running again continues the study. KeyError when the
    study does not exist.

    A finished run (outcome "done" or "timeout") ends by re-measuring its finalists' latencies
    together in this process (workers.finalists.remeasure_finalists, as the Ray runner's task does;
    the study attr FINALISTS_ATTR), unless `remeasure_finalists` is False. The local loop takes no
    latency gate for its trials and none for this either. A failure is logged and recorded in the
    study (the attr's `error`); it never fails the search. Then, when the config's `reseed.top_k`
    > 0 (`reseed_top_k` / `reseed_seeds` override the config's `reseed`), the top k trials by
    validation accuracy are re-trained with `reseed.seeds` seeds in all (workers.finalists.reseed_top_k:
    accuracy noise for `best`, the study attr SEEDS_ATTR), within what is left of `timeout_s` and
    stopped by `stop_event`; a failure there is logged and recorded too. ValueError (naming the
    field) for overrides out of ReseedConfig's bounds.
    """
    study = load_study(study_name, open_storage(storage_url, cache_trials=True))
    cfg, space = study_config(study), study_space(study)
    reseed = _reseed_config(cfg.reseed, reseed_top_k, reseed_seeds)
    Path(artifact_dir).mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(artifact_dir))
    recovered = fail_stale_local_trials(study)
    extra = EvalHooks(should_stop=stop_event.is_set if stop_event is not None else None)
    marker = {"kind": "local", "host": socket.gethostname(), "pid": os.getpid()}
    start = time.monotonic()
    ran, crashed, failures_in_row, last_error = 0, 0, 0, None
    outcome: Outcome = "done"
    phases = None
    if cfg.strategy == "oneshot":  # the supernet first (in this process), then candidates, retraining
        phases = OneshotPhases(study, cfg, space, storage_url, str(artifact_dir))
        try:
            phases.train_supernets(device=device or cfg.device, should_stop=extra.should_stop)
        except Cancelled:
            outcome = "cancelled"
    while outcome != "cancelled":
        if finished(trial_counts(study)) >= (phases.target() if phases else cfg.trials):
            if phases is not None and phases.advance():
                continue
            outcome = "done"
            break
        if cfg.timeout_s is not None and time.monotonic() - start >= cfg.timeout_s:
            outcome = "timeout"
            break
        if stop_event is not None and stop_event.is_set():
            outcome = "cancelled"
            break
        trial = study.ask()
        trial.set_user_attr(RUNNER_ATTR, marker)
        if phases is not None:
            frozen = run_oneshot_trial(study, trial, cfg, space, artifact_dir=str(artifact_dir),
                                       device=device, extra_hooks=extra)
        else:
            frozen = run_trial(study, trial, cfg, space, artifact_store=store, device=device,
                               extra_hooks=extra)
        ran += 1
        if progress is not None:
            progress(study, frozen)
        if frozen.state == TrialState.FAIL:
            failures_in_row += 1
            if not (stop_event is not None and stop_event.is_set()):
                crashed += 1
                last_error = frozen.user_attrs.get(ERROR_ATTR)
            if failures_in_row >= MAX_CONSECUTIVE_FAILURES:
                outcome = "failing"
                break
        else:
            failures_in_row = 0
    if outcome in ("done", "timeout") and remeasure_finalists:
        _remeasure(study, device or cfg.device)
    if outcome in ("done", "timeout") and reseed.top_k:
        deadline = None if cfg.timeout_s is None else time.time() + (start + cfg.timeout_s - time.monotonic())
        _reseed(study, reseed, device or cfg.device, extra.should_stop, deadline)
    counts = trial_counts(study)
    return RunReport(
        outcome=outcome,
        runner="local",
        study_name=study.study_name,
        trials_requested=cfg.trials,
        finished=finished(counts),
        counts=counts,
        ran=ran,
        crashed=crashed,
        last_error=last_error,
        elapsed_s=round(time.monotonic() - start, 3),
        recovered=recovered,
    )


def _remeasure(study: optuna.Study, device: str) -> None:
    """After the last trial: the finalists re-measured together here; a failure is logged and
    recorded in the study (workers.finalists.record_failure), never raised."""
    from workers.finalists import record_failure
    from workers.finalists import remeasure_finalists as remeasure

    try:
        remeasure(study, device=device)
    except Exception as exc:  # the search's trials are done: its outcome stands
        logger.warning("search %s: the finalists' re-measurement failed: %s", study.study_name, exc)
        try:
            record_failure(study, device, f"{type(exc).__name__}: {exc}")
        except Exception as again:  # e.g. the storage went away: the log line is all there is
            logger.warning("search %s: recording that failure failed too: %s", study.study_name, again)


def _reseed_config(configured: ReseedConfig, top_k: int | None, seeds: int | None) -> ReseedConfig:
    """The config's `reseed` with the caller's overrides; ValueError naming the field when out of bounds."""
    given = {name: value for name, value in (("top_k", top_k), ("seeds", seeds)) if value is not None}
    try:
        return ReseedConfig.model_validate({**configured.model_dump(), **given})
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, prefix=("reseed",))) from None


def _reseed(study: optuna.Study, reseed: ReseedConfig, device: str, should_stop: Callable[[], bool] | None,
            deadline: float | None) -> None:
    """After the last trial: the top-k re-trained with more seeds, the study's phase "reseed" meanwhile;
    a failure is logged (and recorded in the study by reseed_top_k), never raised."""
    from workers.finalists import reseed_phase, reseed_top_k

    try:
        with reseed_phase(study):
            reseed_top_k(study, top_k=reseed.top_k, seeds=reseed.seeds, device=device,
                         should_stop=should_stop, deadline=deadline)
    except Exception as exc:  # the search's trials are done: its outcome stands
        logger.warning("search %s: re-training the top %d with %d seeds failed: %s", study.study_name,
                       reseed.top_k, reseed.seeds, exc)
