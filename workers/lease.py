"""Trial leases for ask/tell workers: DB retries, the worker's heartbeat, the coordinator's stale check."""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

logger = logging.getLogger(__name__)

# Trial user attrs written by the Ray runner (besides the contract's spec/metrics/error attrs).
TASK_ATTR = "spsa_nas:task"  # the token of the Ray task that owns the trial
HEARTBEAT_ATTR = "spsa_nas:heartbeat"  # {"seq": n, "time": unix seconds}, refreshed by the owner
RETRY_OF_ATTR = "retry_of"  # number of the trial this one re-runs (its worker was lost)
ATTEMPT_ATTR = "attempt"  # 0 for a fresh trial, k for the k-th re-run of the same parameters
WORKER_LOST_ATTR = "worker_lost"  # True on a trial failed because its worker vanished
CANCELLED_ATTR = "cancelled"  # True on a trial stopped by a cancellation
REASON_ATTR = "reason"  # why a trial failed or was pruned, in words
CANCEL_STUDY_ATTR = "spsa_nas:cancel"  # study user attr: True asks every worker to stop

T = TypeVar("T")


def _is_transient(error: BaseException) -> bool:
    """A lock, a busy database or a dropped connection: worth another try."""
    if isinstance(error, sa_exc.OperationalError):
        return True
    if isinstance(error, optuna.exceptions.StorageInternalError):
        return isinstance(error.__cause__, sa_exc.OperationalError)
    return False


@dataclass
class RetryPolicy:
    """Bounded retries with jittered exponential back-off; counts what it retried."""

    attempts: int = 10
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0
    retries: int = 0  # how many retries happened (a measurement, reported by the runner)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        for attempt in range(self.attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as error:
                if not _is_transient(error) or attempt == self.attempts - 1:
                    raise
                with self._lock:
                    self.retries += 1
                delay = min(self.max_delay_s, self.base_delay_s * 2**attempt)
                logger.debug("storage busy (%s); retry %d in %.2fs", error, attempt + 1, delay)
                time.sleep(delay * (0.5 + random.random()))
        raise AssertionError("unreachable")  # pragma: no cover


def _driver_autocommit(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # pysqlite must not issue its own (deferred) BEGIN


def _begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def serialise_sqlite_writes(storage: BaseStorage) -> None:
    """Make every transaction of an SQLite RDBStorage `BEGIN IMMEDIATE` (no-op for other databases).

    pysqlite runs a SELECT outside any transaction and opens one only at the first write, so
    Optuna's read-check-write steps are not atomic on SQLite: two processes popping the same
    enqueued (WAITING) trial both see it waiting and both take it (measured: 12 of 64 enqueued
    trials run twice by 8 workers). With BEGIN IMMEDIATE the whole step holds SQLite's write lock,
    and a waiting writer is queued by the busy timeout instead of failing with "database is locked".
    """
    if not isinstance(storage, RDBStorage) or storage.engine.dialect.name != "sqlite":
        return
    engine = storage.engine
    if not event.contains(engine, "begin", _begin_immediate):
        event.listen(engine, "connect", _driver_autocommit)
        event.listen(engine, "begin", _begin_immediate)
        engine.dispose()  # pooled connections were opened without the listeners


class RetryingStorage(BaseStorage):
    """An Optuna storage that retries transient database errors (locked, busy, disconnected).

    Every call is one transaction in the wrapped RDBStorage and is rolled back on error, so a
    retry re-runs it from a clean state. The object pickles like the storage it wraps.
    """

    def __init__(self, storage: BaseStorage, policy: RetryPolicy | None = None) -> None:
        self.storage = storage
        self.policy = policy or RetryPolicy()

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.policy.call(getattr(self.storage, name), *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {"storage": self.storage, "attempts": self.policy.attempts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.storage = state["storage"]
        self.policy = RetryPolicy(attempts=state["attempts"])
        serialise_sqlite_writes(self.storage)  # the unpickled storage has a new engine

    # Studies
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self._call("create_new_study", directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self._call("delete_study", study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call("set_study_user_attr", study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call("set_study_system_attr", study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._call("get_study_id_from_name", study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._call("get_study_name_from_id", study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._call("get_study_directions", study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._call("get_study_user_attrs", study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._call("get_study_system_attrs", study_id)

    def get_all_studies(self) -> list[optuna.study.FrozenStudy]:
        return self._call("get_all_studies")

    # Trials
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._call("create_new_trial", study_id, template_trial)

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        self._call("set_trial_param", trial_id, param_name, param_value_internal, distribution)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._call("get_trial_id_from_study_id_trial_number", study_id, trial_number)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        return self._call("set_trial_state_values", trial_id, state, values)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._call("set_trial_intermediate_value", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call("set_trial_user_attr", trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call("set_trial_system_attr", trial_id, key, value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._call("get_trial", trial_id)

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: tuple[TrialState, ...] | None = None
    ) -> list[FrozenTrial]:
        return self._call("get_all_trials", study_id, deepcopy, states)

    def remove_session(self) -> None:
        self.storage.remove_session()

    def close(self) -> None:
        """Give the database connections back (a Ray worker process runs many tasks: each task's
        storage must not keep its pool open, or PostgreSQL runs out of connections)."""
        self.storage.remove_session()
        if isinstance(self.storage, RDBStorage):
            self.storage.engine.dispose()


def open_storage(url: str, policy: RetryPolicy | None = None) -> RetryingStorage:
    """The study storage at `url` (search_spaces.study.storage_for) behind bounded retries, with
    SQLite's transactions made atomic (serialise_sqlite_writes).

    Opening is retried too: RDBStorage creates its tables and its version row on first use, and
    two processes doing so at once on a fresh database collide ("table ... already exists", a
    duplicate alembic_version row); the next try finds them.
    """
    from search_spaces.study import storage_for

    policy = policy or RetryPolicy()
    for attempt in range(policy.attempts):
        try:
            storage = storage_for(url)
            break
        except (sa_exc.OperationalError, sa_exc.IntegrityError, sqlite3.OperationalError,
                optuna.exceptions.StorageInternalError):
            # "table ... already exists" / a duplicate alembic_version row: another process is
            # creating the schema right now; the next try finds it.
            if attempt == policy.attempts - 1:
                raise
            policy.retries += 1
            time.sleep(min(policy.max_delay_s, policy.base_delay_s * 2**attempt) * (0.5 + random.random()))
    serialise_sqlite_writes(storage)
    return RetryingStorage(storage, policy)


class Heartbeat:
    """The owner's side of a trial lease: a daemon thread that refreshes the trial's heartbeat.

    Every `interval_s` it writes HEARTBEAT_ATTR, reads the study's cancel flags and checks that the
    trial is still RUNNING (the coordinator fails a trial whose lease expired; the owner must then
    stop, since its result would no longer be accepted). `stop_reason` says why to stop, if so.
    """

    def __init__(
        self,
        storage: BaseStorage,
        study_id: int,
        trial_id: int,
        interval_s: float,
        *,
        extra_cancel_keys: Sequence[str] = (),
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"heartbeat interval must be > 0 seconds, got {interval_s}")
        self._storage = storage
        self._study_id = study_id
        self._trial_id = trial_id
        self._interval_s = interval_s
        self._cancel_keys = (CANCEL_STUDY_ATTR, *extra_cancel_keys)
        self._done = threading.Event()
        self._seq = 0
        self.stop_reason: str | None = None  # "cancelled" or "lease lost"
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)

    def beat(self) -> None:
        """Refresh the lease once and look at the cancel flag and at the trial's state."""
        self._seq += 1
        self._storage.set_trial_user_attr(
            self._trial_id, HEARTBEAT_ATTR, {"seq": self._seq, "time": time.time()}
        )
        attrs = self._storage.get_study_user_attrs(self._study_id)
        if any(attrs.get(key) is True for key in self._cancel_keys):
            self.stop_reason = self.stop_reason or "cancelled"

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._done.wait(self._interval_s):
            try:
                self.beat()
            except optuna.exceptions.UpdateFinishedTrialError:
                # Someone else finished our trial: the coordinator declared it lost.
                self.stop_reason = self.stop_reason or "lease lost"
                return
            except Exception as error:  # keep beating; the lease tolerates missed beats
                logger.warning("heartbeat of trial %d failed: %s", self._trial_id, error)

    def close(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval_s + 30)


@dataclass
class LeaseTracker:
    """The coordinator's side: which RUNNING trials have not refreshed their heartbeat for a lease.

    It compares heartbeat *values* seen over time on the coordinator's own clock, so clocks of the
    workers do not matter. A trial with no heartbeat at all counts from when it was first seen. A
    freshly started coordinator therefore waits one full lease before it fails anything.
    """

    lease_s: float
    _seen: dict[int, tuple[Any, float]] = field(default_factory=dict)

    def stale(self, running: Sequence[FrozenTrial], now: float | None = None) -> list[FrozenTrial]:
        now = time.monotonic() if now is None else now
        expired = []
        alive: set[int] = set()
        for trial in running:
            alive.add(trial._trial_id)
            beat = trial.user_attrs.get(HEARTBEAT_ATTR)
            key = (beat or {}).get("seq") if isinstance(beat, dict) else beat
            previous = self._seen.get(trial._trial_id)
            if previous is None or previous[0] != key:
                self._seen[trial._trial_id] = (key, now)
            elif now - previous[1] > self.lease_s:
                expired.append(trial)
        for trial_id in list(self._seen):
            if trial_id not in alive:
                del self._seen[trial_id]
        return expired

    def forget(self, trial_id: int) -> None:
        self._seen.pop(trial_id, None)
