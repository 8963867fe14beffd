"""The Ray coordinator of a search: trials as Ray tasks over the shared Optuna storage, with leases,
retries, cancellation and resumption."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from search_spaces.config import Resources, SearchConfig
from search_spaces.keys import (
    ATTEMPT_ATTR,
    CANCELLED_ATTR,
    ERROR_ATTR,
    REASON_ATTR,
    RETRAIN_OF_ATTR,
    RETRY_OF_ATTR,
    TASK_ATTR,
    TRACEBACK_ATTR,
    WORKER_LOST_ATTR,
    run_cancel_attr,
)
from search_spaces.run import Outcome, RunReport
from search_spaces.space import SearchSpace
from search_spaces.storage import RetryingStorage, open_storage
from search_spaces.study import (
    finished,
    load_study,
    make_pruner,
    make_sampler,
    study_config,
    study_space,
    trial_counts,
)
from workers.latency_gate import NodeGate
from workers.lease import Heartbeat, LeaseTracker
from workers.ray_device import task_device

logger = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# attrs a retry of a retraining keeps
RETRAIN_CARRIED = (RETRAIN_OF_ATTR, "oneshot_val_acc", "oneshot_top1", "oneshot_val_loss")
MEMORY_ATTR = "memory_exceeded"  # trial user attr: the RSS that passed the limit (MemoryGuard)


class TrialStoppedError(Exception):
    """Raised by a trial function when `should_stop()` said so (cancelled or lease lost)."""


@dataclass(frozen=True)
class TrialContext:
    """What a trial function gets besides the study and the trial."""

    cfg: SearchConfig
    space: SearchSpace  # the space stored with the study: no file needed on the worker
    artifact_dir: str
    device: str  # "cuda" when Ray gave the task a GPU (cfg.device "auto"), else cfg.device or "cpu"
    should_stop: Callable[[], bool]  # poll between steps; also where training pauses for latency
    latency_lock: Callable[[], AbstractContextManager[None]]  # hold the host for one measurement
    node_id: str
    hostname: str


TrialFn = Callable[[optuna.Study, optuna.Trial, TrialContext], None]


@dataclass(frozen=True)
class RunnerOptions:
    """Knobs of the coordinator; the defaults suit real trials (minutes each)."""

    heartbeat_s: float = 5.0  # how often a task refreshes its trial's heartbeat
    lease_s: float = 60.0  # a RUNNING trial whose heartbeat stood still this long is lost
    poll_s: float = 1.0  # how often the coordinator looks at the storage
    cancel_grace_s: float = 30.0  # after a cancel, how long tasks may take to stop by themselves
    lock_dir: str | None = None  # the host's latency lock files; None: latency_gate.default_lock_dir()
    pause_training_during_latency: bool = True  # trainers on the host pause while one measures
    resources: dict[str, float] = field(default_factory=dict)  # extra Ray custom resources per trial
    max_consecutive_failures: int | None = None  # stop after this many crashed trials in a row;
    # None: max(10, 2 * parallelism)
    nice: int | None = None  # CPU niceness (0-19) of the trial processes; None: left as Ray made them.
    # The service sets it so that its API stays responsive on a machine that also trains.
    memory_bytes: int | None = None  # per-trial memory when the config's resources.memory_gb is None:
    # Ray's `memory` resource (so a node is not overcommitted) and the trial process's RSS limit
    # (past it the process kills itself, as the OOM killer would: a lost worker, counted as a crash)
    memory_check_s: float = 0.5  # how often a trial process compares its RSS with the limit
    pending_timeout_s: float | None = 900.0  # a trial task not started after this long (no node has
    # the resources it asks for) fails the search with that reason; None: wait for ever
    remeasure_finalists: bool = True  # a finished run (done, timeout) ends by re-measuring its finalists'
    # latencies together on a worker with a trial's resources (workers.finalists, docs/latency.md)

    def __post_init__(self) -> None:
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError(f"RunnerOptions: memory_bytes must be > 0, got {self.memory_bytes}")
        if self.pending_timeout_s is not None and self.pending_timeout_s <= 0:
            raise ValueError(f"RunnerOptions: pending_timeout_s must be > 0, got {self.pending_timeout_s}")
        self._check_timing()

    def memory_limit(self, resources: Resources) -> int | None:
        """Bytes one trial may use: the config's memory_gb, else memory_bytes, else None (no limit)."""
        if resources.memory_gb is not None:
            return int(resources.memory_gb * 2**30)
        return self.memory_bytes

    def _check_timing(self) -> None:
        if self.heartbeat_s <= 0 or self.poll_s <= 0 or self.cancel_grace_s < 0:
            raise ValueError("RunnerOptions: heartbeat_s and poll_s must be > 0, cancel_grace_s >= 0")
        if self.nice is not None and not 0 <= self.nice <= 19:
            raise ValueError(f"RunnerOptions: nice must be between 0 and 19, got {self.nice}")
        if self.lease_s <= 2 * self.heartbeat_s:
            raise ValueError(
                f"RunnerOptions: lease_s ({self.lease_s}) must exceed twice heartbeat_s "
                f"({self.heartbeat_s}), or live trials would be declared lost"
            )


def _default_trial_fn(study: optuna.Study, trial: optuna.Trial, ctx: TrialContext) -> None:
    """The real trial: suggest an architecture, evaluate it, tell (workers.trial.run_trial)."""
    from optuna.artifacts import FileSystemArtifactStore

    from spsa_nas.evaluate import EvalHooks
    from workers.trial import run_trial

    Path(ctx.artifact_dir).mkdir(parents=True, exist_ok=True)
    run_trial(
        study,
        trial,
        ctx.cfg,
        ctx.space,
        artifact_store=FileSystemArtifactStore(ctx.artifact_dir),
        device=ctx.device,
        extra_hooks=EvalHooks(latency_lock=ctx.latency_lock, should_stop=ctx.should_stop),
    )


def _rss_bytes() -> int | None:
    """This process's resident memory (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryGuard:
    """A thread that kills its process (SIGKILL, as the kernel's OOM killer would) when the
    process's RSS passes `limit` bytes, so one trial cannot take its host down. The coordinator
    then sees a lost worker, fails and retries the trial and counts it toward the crash streak."""

    def __init__(self, limit: int, every_s: float, on_exceeded: Callable[[int], None]) -> None:
        self.limit, self.every_s, self.on_exceeded = limit, every_s, on_exceeded
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="spsa-memory-guard", daemon=True)

    def start(self) -> MemoryGuard:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            rss = _rss_bytes()
            if rss is not None and rss > self.limit:
                with suppress(Exception):  # best effort: the kill below must happen
                    self.on_exceeded(rss)
                os.kill(os.getpid(), signal.SIGKILL)


def _set_attr_quietly(storage: optuna.storages.BaseStorage, trial_id: int, key: str, value: Any) -> bool:
    try:
        storage.set_trial_user_attr(trial_id, key, value)
        return True
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def _lower_priority(nice: int) -> None:
    """Run this worker process's trials at CPU niceness `nice` (threads created later inherit it).

    Raising niceness needs no privilege; lowering it again (a reused worker asked for less) does,
    so a worker already nicer than asked stays as it is.
    """
    if os.getpriority(os.PRIO_PROCESS, 0) < nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)


@dataclass(frozen=True)
class _TaskSpec:
    """What every task of one run shares (put into Ray's object store once per run)."""

    storage_url: str
    study_name: str
    cfg: SearchConfig  # read from the study once, by the coordinator
    space: SearchSpace
    artifact_dir: str
    run_id: str
    trial_fn: TrialFn | None
    options: RunnerOptions


#: What identifies one study in a database across its deletion: SQLite hands a deleted study's id,
#: and its trials' ids, to the next ones created, so the id alone does not tell a study from one
#: recreated under the same name; its trial 0's id and start time do.
StudyFingerprint = tuple[int, int | None, Any]

#: Trial tasks' storages, kept between the tasks of one worker process (at most TASK_STORAGES_KEPT):
#: (url, study name) -> (storage, fingerprint). Optuna's trial cache then reads each finished trial
#: of a study once per worker process instead of once per task: `ask` reads the whole study, whose
#: finished trials, by then hundreds with their ~35 user attrs each, no process can change.
_task_storages: dict[tuple[str, str], tuple[RetryingStorage, StudyFingerprint]] = {}
TASK_STORAGES_KEPT = 4


def _fingerprint(storage: RetryingStorage, study_name: str) -> StudyFingerprint:
    """The study's id, its trial 0's id and start (None before it has one); read uncached. KeyError
    when no study has that name."""
    backend = storage.backend
    study_id = storage.policy.call(backend.get_study_id_from_name, study_name)
    try:
        first = storage.policy.call(backend.get_trial_id_from_study_id_trial_number, study_id, 0)
    except KeyError:
        return (study_id, None, None)
    return (study_id, first, storage.policy.call(backend.get_trial, first).datetime_start)


def task_storage(url: str, study_name: str) -> RetryingStorage:
    """The storage a trial task of study `study_name` at `url` uses: this worker process's from an
    earlier task of the same study when the study is still that one (same id, same first trial),
    else a new one (cache_trials). The caller gives its connections back at the task's end
    (`close()`, which keeps the object and its trial cache; the next task reconnects)."""
    key = (url, study_name)
    kept = _task_storages.pop(key, None)
    if kept is not None:
        storage, fingerprint = kept
        try:
            if _fingerprint(storage, study_name) == fingerprint:
                _task_storages[key] = kept  # the most recently used last
                return storage
        except Exception:  # gone, or unreachable: a new storage decides (and raises what it meets)
            pass
        storage.close()
    storage = open_storage(url, cache_trials=True)
    try:
        fingerprint = _fingerprint(storage, study_name)
    except KeyError:  # no such study (load_study says so): nothing worth keeping
        return storage
    _task_storages[key] = (storage, fingerprint)
    while len(_task_storages) > TASK_STORAGES_KEPT:
        oldest = next(iter(_task_storages))
        _task_storages.pop(oldest)[0].close()
    return storage


def _trial_task(spec: _TaskSpec, token: str, seed_offset: int) -> dict[str, Any]:
    """One Ray task: ask (or take an enqueued retry), run the trial, make sure it is told.

    `seed_offset` is distinct per task (of every run of the study), so that parallel tasks'
    samplers, seeded from cfg.seed, do not all draw the same architecture."""
    task_start = time.perf_counter()
    if spec.options.nice is not None:
        _lower_priority(spec.options.nice)
    storage = task_storage(spec.storage_url, spec.study_name)
    retries = storage.policy.retries
    try:
        return _run_one(storage, spec, token, seed_offset, task_start, retries)
    finally:
        storage.close()


def _run_one(
    storage: RetryingStorage, spec: _TaskSpec, token: str, seed_offset: int, task_start: float,
    retries_before: int = 0,
) -> dict[str, Any]:
    import ray

    cfg, options = spec.cfg, spec.options
    study = optuna.load_study(study_name=spec.study_name, storage=storage,
                              sampler=make_sampler(cfg, seed_offset=seed_offset), pruner=make_pruner(cfg))
    trial = study.ask()
    trial_id = trial._trial_id
    node_id = ray.get_runtime_context().get_node_id()
    hostname = socket.gethostname()
    device = task_device(cfg.device)
    for key, value in {
        TASK_ATTR: token,
        "worker_pid": os.getpid(),
        "node_id": node_id,
        "hostname": hostname,
        "device": device,
    }.items():
        storage.set_trial_user_attr(trial_id, key, value)

    heartbeat = Heartbeat(storage, study._study_id, trial_id, options.heartbeat_s,
                          cancel_key=run_cancel_attr(spec.run_id)).start()
    gate = NodeGate(options.lock_dir, pause_training=options.pause_training_during_latency)
    marked: list[str] = []

    def should_stop() -> bool:
        reason = heartbeat.stop_reason
        if reason is None:
            gate.checkpoint()
            return False
        if not marked:
            marked.append(reason)
            if reason == "cancelled":
                _set_attr_quietly(storage, trial_id, CANCELLED_ATTR, True)
                _set_attr_quietly(storage, trial_id, REASON_ATTR, "cancelled")
        return True

    ctx = TrialContext(cfg=cfg, space=spec.space, artifact_dir=spec.artifact_dir, device=device,
                       should_stop=should_stop, latency_lock=gate.latency_lock, node_id=node_id,
                       hostname=hostname)
    limit = options.memory_limit(cfg.resources)
    guard = None
    if limit is not None:
        def exceeded(rss: int) -> None:
            logger.error("trial %d: RSS %d bytes passed its limit %d; killing its worker",
                         trial.number, rss, limit)
            _set_attr_quietly(storage, trial_id, MEMORY_ATTR, f"RSS {rss} bytes > limit {limit} bytes")

        guard = MemoryGuard(limit, options.memory_check_s, exceeded).start()
    trial_start = time.perf_counter()
    error: BaseException | None = None
    try:
        (spec.trial_fn or _default_trial_fn)(study, trial, ctx)
    except Exception as exc:  # the trial failed: record it, the search goes on
        error = exc
        tb = traceback.format_exc()
    finally:
        trial_s = time.perf_counter() - trial_start
        if guard is not None:
            guard.close()
        heartbeat.close()
        gate.close()

    told = storage.get_trial(trial_id)
    if told.state == TrialState.RUNNING:
        stopped = heartbeat.stop_reason == "cancelled"
        if error is None:
            error, tb = RuntimeError("the trial function returned without telling a result"), ""
        attrs: dict[str, Any] = {ERROR_ATTR: f"{type(error).__name__}: {error}", TRACEBACK_ATTR: tb}
        if stopped:
            attrs.update({CANCELLED_ATTR: True, REASON_ATTR: "cancelled"})
        for key, value in attrs.items():
            _set_attr_quietly(storage, trial_id, key, value)
        with suppress(optuna.exceptions.UpdateFinishedTrialError):
            study.tell(trial, state=TrialState.FAIL)
        told = storage.get_trial(trial_id)
    # A trial function that tells FAIL itself (run_trial does) raises nothing: its error is the attr.
    error_text = f"{type(error).__name__}: {error}" if error is not None else told.user_attrs.get(ERROR_ATTR)
    return {
        "token": token,
        "trial_number": trial.number,
        "state": told.state.name,
        "node_id": node_id,
        "trial_s": trial_s,
        "task_s": time.perf_counter() - task_start,
        "db_retries": storage.policy.retries - retries_before,
        "stop_reason": heartbeat.stop_reason,
        "error": error_text,
    }


def _ready(ray: Any, refs: list[Any], timeout_s: float) -> list[Any]:
    """The tasks of `refs` that have finished: as soon as one has (or after `timeout_s` with none),
    with every other one finished by then. Waiting for all of them instead would hold a freed slot
    idle until the slowest task of the batch ends or the timeout passes."""
    ready, rest = ray.wait(refs, num_returns=1, timeout=timeout_s)
    if ready and rest:
        more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
        ready += more
    return list(ready)


RayMode = Literal["local", "cluster", "caller"]


def _connect_ray(ray_address: str | None) -> RayMode:
    """Initialise Ray unless the caller already did. Returns "caller" (already initialised: left as
    is), "local" (a Ray started here, in-process) or "cluster" (connected to an existing one); the
    latter two are shut down (disconnected) at the end."""
    import ray

    if ray.is_initialized():
        return "caller"
    address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except Exception as error:
        hint = ""
        if address != "local":
            hint = (
                " If the cluster is up, check that it and this process agree on Ray's token "
                "authentication: both RAY_AUTH_MODE=token with the same token (RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token on both sides; an explicit address never "
                "turns token mode on by itself), or both RAY_AUTH_MODE=disabled. See docs/workers.md."
            )
        raise RuntimeError(f"could not connect to Ray at {address!r}: {error}.{hint}") from error
    return "local" if address == "local" else "cluster"


@dataclass
class _Run:
    """The coordinator's bookkeeping for one run_search call."""

    study: optuna.Study
    storage: RetryingStorage
    cfg: SearchConfig
    options: RunnerOptions
    run_id: str
    in_flight: dict[Any, str] = field(default_factory=dict)  # ObjectRef -> task token
    claimed: dict[int, str] = field(default_factory=dict)  # trial number -> token (duplicates)
    duplicates: int = 0
    worker_lost: int = 0
    retries_enqueued: int = 0
    crashed: int = 0
    crash_streak: int = 0
    last_error: str | None = None
    trial_s: float = 0.0
    task_s: float = 0.0
    worker_db_retries: int = 0
    dispatched: int = 0
    tokens: set[str] = field(default_factory=set)  # every task token of this run
    dispatched_at: dict[str, float] = field(default_factory=dict)  # token -> monotonic time, until started
    pending_error: str | None = None  # why the search fails: a task never got its resources

    def trials(self, *states: TrialState) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states or None)

    def fail_lost(self, trial: FrozenTrial, why: str) -> None:
        """Fail a trial whose worker vanished and re-enqueue its parameters (bounded)."""
        trial_id = trial._trial_id
        if not _set_attr_quietly(self.storage, trial_id, WORKER_LOST_ATTR, True):
            return
        _set_attr_quietly(self.storage, trial_id, REASON_ATTR, f"worker lost: {why}")
        _set_attr_quietly(self.storage, trial_id, ERROR_ATTR, f"worker lost: {why}")
        try:
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # it finished after all
        self.worker_lost += 1
        # a lost worker (killed, OOM-killed, crashed, frozen) is a crash like an exception: a
        # search whose every trial kills its worker stops at the crash streak instead of retrying
        self.crashed += 1
        self.crash_streak += 1
        memory = self.storage.get_trial(trial_id).user_attrs.get(MEMORY_ATTR)
        self.last_error = f"worker lost: {why}" + (f" (memory limit: {memory})" if memory else "")
        logger.warning("trial %d: %s; marked FAIL", trial.number, why)
        self.enqueue_retry(self.storage.get_trial(trial_id))

    def fail_cancelled(self, trial: FrozenTrial, reason: str = "cancelled") -> None:
        trial_id = trial._trial_id
        _set_attr_quietly(self.storage, trial_id, CANCELLED_ATTR, True)
        _set_attr_quietly(self.storage, trial_id, REASON_ATTR, reason)
        _set_attr_quietly(self.storage, trial_id, ERROR_ATTR, reason)
        with suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)

    def enqueue_retry(self, trial: FrozenTrial) -> None:
        attempt = int(trial.user_attrs.get(ATTEMPT_ATTR, 0)) + 1
        if attempt > self.cfg.max_retries:
            logger.warning("trial %d lost its worker %d times; not retried (max_retries=%d)",
                           trial.number, attempt, self.cfg.max_retries)
            return
        attrs = {RETRY_OF_ATTR: trial.number, ATTEMPT_ATTR: attempt}
        # a oneshot retraining stays one: it keeps the candidate it retrains and its estimates
        attrs.update({k: trial.user_attrs[k] for k in RETRAIN_CARRIED if k in trial.user_attrs})
        self.study.enqueue_trial(trial.params, user_attrs=attrs)
        self.retries_enqueued += 1

    def reconcile_retries(self) -> None:
        """Re-enqueue lost trials whose retry is missing (a coordinator died in between)."""
        trials = self.trials()
        retried = {t.user_attrs.get(RETRY_OF_ATTR) for t in trials}
        for trial in trials:
            if (trial.state == TrialState.FAIL and trial.user_attrs.get(WORKER_LOST_ATTR)
                    and trial.number not in retried):
                self.enqueue_retry(trial)

    def owned_by(self, token: str) -> list[FrozenTrial]:
        return [t for t in self.trials(TrialState.RUNNING) if t.user_attrs.get(TASK_ATTR) == token]


def run_search(
    study_name: str,
    storage_url: str,
    *,
    artifact_dir: str | Path,
    ray_address: str | None = None,
    should_cancel: Callable[[], bool] | None = None,
    trial_fn: TrialFn | None = None,
    options: RunnerOptions | None = None,
) -> RunReport:
    """Run (or resume) the search of the study `study_name` on Ray until its config's `trials`
    trials finished (COMPLETE or PRUNED), its `timeout_s` ran out, it was cancelled, or trials kept
    crashing.

    The study must exist (search_spaces.study.create_study, which the CLI and the service call
    when the search is submitted): its config and space are read from it once, here, and handed
    to the tasks. ray_address: an existing cluster ("host:port"); None: RAY_ADDRESS, else a local
    Ray started in this process (and shut down at the end). A Ray already initialised by the
    caller is used as is. should_cancel(): polled every `options.poll_s`; True stops this run
    (the coordinator then tells its tasks through the study attr run_cancel_attr(run id)).
    trial_fn(study, trial, ctx): runs one ask'd trial and tells it; default: workers.trial.run_trial.
    A run that ends done or timeout then re-measures its finalists (options.remeasure_finalists)
    and re-trains its top-k with more seeds (the config's `reseed`, _reseed): Ray tasks whose
    failures are recorded in the study, never the search's outcome.
    KeyError when the study does not exist.
    """
    import ray

    options = options or RunnerOptions()
    artifact_dir = str(Path(artifact_dir).resolve())
    start = time.monotonic()
    storage = open_storage(storage_url, cache_trials=True)
    try:
        study = load_study(study_name, storage)
        cfg, space = study_config(study), study_space(study)
    except BaseException:
        storage.close()
        raise
    run = _Run(study=study, storage=storage, cfg=cfg, options=options, run_id=uuid.uuid4().hex[:12])
    ray_mode = _connect_ray(ray_address)
    phases = None
    if cfg.strategy == "oneshot":  # the supernet phase (Ray Train) first; then candidates, retraining
        from workers.oneshot import OneshotPhases, oneshot_trial_fn

        phases = OneshotPhases(study, cfg, space, storage_url, artifact_dir)
        trial_fn = trial_fn or oneshot_trial_fn
    spec = ray.put(_TaskSpec(storage_url=storage_url, study_name=study_name, cfg=cfg, space=space,
                             artifact_dir=artifact_dir, run_id=run.run_id, trial_fn=trial_fn,
                             options=options))
    seed_base = len(run.trials())  # task seeds never repeat those of an earlier run of the study
    resources = cfg.resources
    memory = options.memory_limit(resources)
    task = ray.remote(_trial_task).options(
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
        memory=memory,
        resources=dict(options.resources) or None,
        max_retries=0,  # a re-run would ask a new trial; lost trials are retried by the lease instead
        retry_exceptions=False,
        name=f"spsa-nas-trial:{study_name}",
    )
    max_streak = options.max_consecutive_failures or max(10, 2 * cfg.parallelism)
    tracker = LeaseTracker(options.lease_s)
    cancel_since: float | None = None
    forced = False
    outcome: Outcome = "done"
    try:
        run.reconcile_retries()
        if phases is not None and not phases.train_supernets_ray(
                run_id=run.run_id, should_cancel=should_cancel, poll_s=options.poll_s):
            cancel_since = time.monotonic()  # cancelled while the supernet trained
        while True:
            target = phases.target() if phases is not None else cfg.trials
            now = time.monotonic()
            if cancel_since is None and should_cancel is not None and should_cancel():
                cancel_since = now
                storage.set_study_user_attr(study._study_id, run_cancel_attr(run.run_id), True)
                logger.warning("search %s: cancelling %d running trials", study_name, len(run.in_flight))
            if cancel_since is not None and not forced and now - cancel_since >= options.cancel_grace_s:
                forced = True
                for ref in run.in_flight:
                    ray.cancel(ref, force=True)
            running = run.trials(TrialState.RUNNING)
            ours = set(run.in_flight.values())
            for trial in tracker.stale(running, now):
                tracker.forget(trial._trial_id)
                token = trial.user_attrs.get(TASK_ATTR)
                if cancel_since is not None:
                    run.fail_cancelled(trial)
                else:
                    run.fail_lost(trial, f"no heartbeat for {options.lease_s:g} s")
                for ref, ref_token in run.in_flight.items():
                    if ref_token == token:
                        ray.cancel(ref, force=True)
            running = run.trials(TrialState.RUNNING)
            foreign = [t for t in running if t.user_attrs.get(TASK_ATTR) not in ours]
            done = len(run.trials(*FINISHED))
            timed_out = cfg.timeout_s is not None and now - start >= cfg.timeout_s
            _check_pending(run, ray, now, resources, memory)
            failing = run.crash_streak >= max_streak or run.pending_error is not None
            if cancel_since is None and not timed_out and not failing:
                need = target - done - len(run.in_flight) - len(foreign)
                for _ in range(max(0, min(need, cfg.parallelism - len(run.in_flight)))):
                    token = uuid.uuid4().hex
                    ref = task.remote(spec, token, seed_base + run.dispatched)
                    run.in_flight[ref] = token
                    run.tokens.add(token)
                    run.dispatched_at[token] = now
                    run.dispatched += 1
            stopping = cancel_since is not None or timed_out or failing or done >= target
            if not run.in_flight:
                if stopping and (cancel_since is not None or not foreign):
                    if (phases is not None and done >= target and cancel_since is None and not timed_out
                            and not failing and phases.advance()):
                        continue  # the next phase (retraining) enqueued its trials
                    outcome = ("cancelled" if cancel_since is not None else "failing" if failing
                               else "done" if done >= target else "timeout")
                    break
                time.sleep(options.poll_s)  # foreign trials (an earlier coordinator's) still running
                continue
            for ref in _ready(ray, list(run.in_flight), options.poll_s):
                _collect(run, ref, ray, cancelled=cancel_since is not None)
        if cancel_since is not None:
            for trial in run.trials(TrialState.RUNNING):
                if trial.user_attrs.get(TASK_ATTR) in run.tokens:
                    run.fail_cancelled(trial)
        if outcome in ("done", "timeout") and options.remeasure_finalists:
            _remeasure_finalists(run, ray, spec, should_cancel)
        if outcome in ("done", "timeout") and cfg.reseed.top_k:
            deadline = None if cfg.timeout_s is None else start + cfg.timeout_s
            _reseed(run, ray, spec, should_cancel, deadline)
        return _report(run, outcome, time.monotonic() - start, ray_mode)
    except KeyboardInterrupt:  # Ctrl-C of the CLI: stop the tasks, record their trials, re-raise
        for ref in run.in_flight:
            ray.cancel(ref, force=True)
        for trial in run.trials(TrialState.RUNNING):
            if trial.user_attrs.get(TASK_ATTR) in run.tokens:
                run.fail_cancelled(trial, reason="interrupted")
        raise
    except Exception:  # e.g. the storage is gone past its retries: stop the tasks, then report it
        for ref in run.in_flight:  # (their trials stay RUNNING: the next run fails and retries them)
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    finally:
        storage.close()
        if ray_mode != "caller":
            ray.shutdown()


def _finalists_task(spec: _TaskSpec) -> dict[str, Any] | None:
    """A Ray task: the finalists of the study re-measured together on this worker, under the host's
    latency gate (workers.finalists.remeasure_task); a failure is recorded in the study."""
    from workers.finalists import remeasure_task

    options = spec.options
    return remeasure_task(spec.storage_url, spec.study_name, device=spec.cfg.device,
                          lock_dir=options.lock_dir, pause_training=options.pause_training_during_latency)


def _remeasure_finalists(run: _Run, ray: Any, spec: Any, should_cancel: Callable[[], bool] | None) -> None:
    """After the last trial: the finalists re-measured together by one Ray task with a trial's
    resources (so on the kind of worker the trials ran on); a cancel stops it; a failure is logged
    and recorded in the study by the task, and never fails the search."""
    from search_spaces.finalists import finalist_trials

    if not finalist_trials(run.study):
        return
    resources = run.cfg.resources
    ref = ray.remote(_finalists_task).options(
        num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
        memory=run.options.memory_limit(resources), resources=dict(run.options.resources) or None,
        max_retries=0, retry_exceptions=False, name=f"spsa-nas-finalists:{run.study.study_name}",
    ).remote(spec)
    while not ray.wait([ref], timeout=run.options.poll_s)[0]:
        if should_cancel is not None and should_cancel():
            ray.cancel(ref, force=True)
            return
    try:
        ray.get(ref)
    except Exception as error:
        logger.warning("search %s: the finalists' re-measurement failed: %s", run.study.study_name,
                       str(error)[-600:])


def _reseed_task(spec: _TaskSpec, arch: dict[str, Any], seed: int, latency: Any) -> float:
    """A Ray task: one re-training of a trial's architecture `arch` with training seed `seed`
    (workers.finalists.retrain_seed; `latency`: the trial's measurement, a TrialLatency), on this
    worker, pausing while the host measures a latency (its latency gate), within the trial's memory
    limit. Returns the validation accuracy; it writes nothing (the coordinator records it), so a
    cancel may kill it at any point."""
    from spsa_nas.evaluate import EvalHooks
    from workers.finalists import retrain_seed

    options, cfg = spec.options, spec.cfg
    if options.nice is not None:
        _lower_priority(options.nice)
    device = task_device(cfg.device)
    gate = NodeGate(options.lock_dir, pause_training=options.pause_training_during_latency)
    limit = options.memory_limit(cfg.resources)
    guard = None
    if limit is not None:
        def exceeded(rss: int) -> None:
            logger.error("re-training seed %d: RSS %d bytes passed its limit %d; killing its worker",
                         seed, rss, limit)

        guard = MemoryGuard(limit, options.memory_check_s, exceeded).start()

    def should_stop() -> bool:
        gate.checkpoint()  # another process of the host measures a latency: wait
        return False

    try:
        hooks = EvalHooks(latency_cache=latency, latency_lock=gate.latency_lock, should_stop=should_stop)
        return retrain_seed(cfg, arch, seed, device=device, hooks=hooks)
    finally:
        if guard is not None:
            guard.close()
        gate.close()


def _reseed(run: _Run, ray: Any, spec: Any, should_cancel: Callable[[], bool] | None,
            deadline: float | None) -> dict[str, Any] | None:
    """After the last trial (and the finalists' re-measurement): the config's `reseed.top_k` trials
    re-trained with more seeds (workers.finalists.reseed_candidates), each extra seed one Ray task
    with a trial's resources, `parallelism` at once. The coordinator records the study attr
    SEEDS_ATTR (search_spaces.finalists.seeds_record) after each result and at the end, as the local
    runner does; the study's phase reads "reseed" meanwhile. A cancel (`should_cancel`) or the run's
    `deadline` (monotonic: start + timeout_s) stops the tasks in flight (`stopped` says which); a
    failed task is recorded (`error`) and the others go on; nothing here fails the search."""
    from search_spaces.finalists import seeds_record
    from search_spaces.keys import SEEDS_ATTR
    from workers.finalists import TrialLatency, reseed_candidates, reseed_phase

    cfg, study = run.cfg, run.study
    reseed, name = cfg.reseed, study.study_name
    try:
        top = reseed_candidates(study, reseed.top_k)
    except Exception as error:  # the storage: logged, the search's outcome stands
        logger.warning("search %s: could not choose the trials to re-train: %s", name, error)
        return None
    if not top:
        return None
    base = cfg.train.seed
    by_trial = {t.number: {base: float(t.user_attrs["val_acc"])} for t in top}
    jobs = [(t, base + extra) for t in top for extra in range(1, reseed.seeds)]
    resources = cfg.resources
    task = ray.remote(_reseed_task).options(
        num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
        memory=run.options.memory_limit(resources), resources=dict(run.options.resources) or None,
        max_retries=0, retry_exceptions=False, name=f"spsa-nas-reseed:{name}",
    )
    in_flight: dict[Any, tuple[FrozenTrial, int]] = {}
    errors: list[str] = []
    stopped: str | None = None

    def record() -> dict[str, Any]:
        out = seeds_record(by_trial, seeds=reseed.seeds, top_k=reseed.top_k, planned=[t.number for t in top],
                           stopped=stopped, error="; ".join(errors) or None)
        try:
            study.set_user_attr(SEEDS_ATTR, out)
        except Exception as error:  # the storage: logged, the search's outcome stands
            logger.warning("search %s: could not record the re-training: %s", name, error)
        return out

    logger.info("search %s: re-training the top %d with %d seeds (%d tasks)", name, len(top), reseed.seeds,
                len(jobs))
    with reseed_phase(study):
        while jobs or in_flight:
            if should_cancel is not None and should_cancel():
                stopped = "cancelled"
            elif deadline is not None and time.monotonic() >= deadline:
                stopped = "timeout"
            if stopped is not None:
                for ref in in_flight:
                    ray.cancel(ref, force=True)
                logger.warning("search %s: re-training with more seeds stopped (%s)", name, stopped)
                break
            while jobs and len(in_flight) < cfg.parallelism:
                trial, seed = jobs.pop(0)
                ref = task.remote(spec, trial.user_attrs["spec"], seed, TrialLatency.of(trial))
                in_flight[ref] = (trial, seed)
            for ref in _ready(ray, list(in_flight), run.options.poll_s):
                trial, seed = in_flight.pop(ref)
                try:
                    by_trial[trial.number][seed] = float(ray.get(ref))
                except Exception as error:  # the task failed or its worker died: recorded, others go on
                    cause = getattr(error, "cause", None) or error  # a RayTaskError's: the task's own
                    errors.append(f"trial {trial.number} seed {seed}: {type(cause).__name__}: "
                                  f"{str(cause)[:400]}")
                    logger.warning("search %s: %s", name, errors[-1])
                    continue
                if len(by_trial[trial.number]) == reseed.seeds:
                    record()  # progress: a trial's seeds are all in
        return record()


def _fits_some_node(ray: Any, resources: Resources, memory: int | None) -> bool:
    """Whether one alive node of the cluster has, in all, what one trial asks for."""
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        total = node.get("Resources", {})
        if (
            total.get("CPU", 0.0) >= resources.num_cpus
            and total.get("GPU", 0.0) >= resources.num_gpus
            and (memory is None or total.get("memory", 0.0) >= memory)
        ):
            return True
    return False


def _check_pending(run: _Run, ray: Any, now: float, resources: Resources, memory: int | None) -> None:
    """Forget the tasks that started (their token is on a trial); when one has waited longer than
    `pending_timeout_s` for resources that no node of the cluster has in all, fail the search with
    that reason and cancel the tasks still waiting (they hold no trial). A task queued behind other
    work on a node that could run it is not pending in this sense."""
    timeout = run.options.pending_timeout_s
    if not run.dispatched_at or timeout is None or run.pending_error is not None:
        return
    started = {t.user_attrs.get(TASK_ATTR) for t in run.trials()}
    for token in [token for token in run.dispatched_at if token in started]:
        del run.dispatched_at[token]
    waiting = {token: since for token, since in run.dispatched_at.items() if token in run.in_flight.values()}
    if not waiting or now - min(waiting.values()) < timeout:
        return
    if _fits_some_node(ray, resources, memory):
        # a node could run it once others' work ends: the cluster is busy, not short (a long search
        # on a shared cluster waits as long as it takes)
        return
    asked = f"num_cpus={resources.num_cpus:g}, num_gpus={resources.num_gpus:g}"
    if memory is not None:
        asked += f", memory={memory / 2**30:.3g} GiB"
    run.pending_error = (
        f"a trial waited {timeout:g} s for resources ({asked}) no node of the cluster could give "
        f"(cluster total: {ray.cluster_resources()}); lower the search's resources, or raise "
        "the runner's pending_timeout_s"
    )
    run.last_error = run.pending_error
    logger.error("search %s: %s", run.study.study_name, run.pending_error)
    for ref, token in run.in_flight.items():
        if token in waiting:
            ray.cancel(ref, force=True)
    run.dispatched_at.clear()


def _collect(run: _Run, ref: Any, ray: Any, *, cancelled: bool) -> None:
    """Take one finished task's outcome; a task that died leaves its trial to be failed here."""
    token = run.in_flight.pop(ref)
    try:
        result = ray.get(ref)
    except Exception as error:  # the worker died, or the task was cancelled by force
        why = f"{type(error).__name__}"
        for trial in run.owned_by(token):
            if cancelled:
                run.fail_cancelled(trial)
            else:
                run.fail_lost(trial, f"Ray task ended with {why}")
        if not cancelled:
            logger.warning("trial task %s ended with %s: %s", token[:8], why, str(error)[-600:])
        return
    number = result["trial_number"]
    if number in run.claimed:
        run.duplicates += 1
        logger.error("trial %d was run by two tasks", number)
    run.claimed[number] = token
    run.trial_s += result["trial_s"]
    run.task_s += result["task_s"]
    run.worker_db_retries += result["db_retries"]
    if result["state"] == "FAIL" and result["stop_reason"] is None:
        run.crashed += 1
        run.crash_streak += 1
        run.last_error = result["error"]
    elif result["state"] in ("COMPLETE", "PRUNED"):
        run.crash_streak = 0


def _report(run: _Run, outcome: Outcome, wall_s: float, ray_mode: RayMode) -> RunReport:
    trials = run.trials()
    counts = trial_counts(run.study)
    return RunReport(
        outcome=outcome,
        runner="ray",
        study_name=run.study.study_name,
        trials_requested=run.cfg.trials,
        finished=finished(counts),
        counts=counts,
        ran=run.dispatched,
        crashed=run.crashed,
        last_error=run.last_error,
        elapsed_s=round(wall_s, 3),
        run_id=run.run_id,
        cancelled_trials=sum(bool(t.user_attrs.get(CANCELLED_ATTR)) for t in trials),
        worker_lost=run.worker_lost,
        retries_enqueued=run.retries_enqueued,
        duplicate_claims=run.duplicates,
        trial_s=run.trial_s,
        task_s=run.task_s,
        db_retries=run.storage.policy.retries + run.worker_db_retries,
        ray=ray_mode,
    )
