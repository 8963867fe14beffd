"""The one way to open spsa-nas's database: SQLite pragmas and busy timeout, PostgreSQL pool, retries,
and BEGIN IMMEDIATE for SQLite writes; used by the CLI, the workers and the service."""

from __future__ import annotations

import contextlib
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url

logger = logging.getLogger(__name__)

EXAMPLE_URLS = "sqlite:///runs/spsa-nas.db, postgresql+psycopg://user@host/db"
# How long a connection waits for SQLite's write lock, everywhere (the retries go on after it); a
# trial lease is several times this (service.core.settings checks it).
SQLITE_BUSY_TIMEOUT_S = 15.0
POSTGRES_POOL: dict[str, Any] = {"pool_size": 5, "max_overflow": 10, "pool_pre_ping": True}
WRITE_METHODS = ("create_", "set_", "delete_")  # storage methods that write (BEGIN IMMEDIATE on SQLite)

T = TypeVar("T")


# --- URLs and engine settings, shared with the service's own SQLAlchemy engine ---------------------

def database_url(url: str | URL) -> URL:
    """`url` parsed; ValueError with an example when it is not a database URL."""
    if isinstance(url, URL):
        return url
    try:
        return make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError for malformed URLs
        raise ValueError(f"storage URL {url!r} is not a database URL (e.g. {EXAMPLE_URLS}): {exc}") from None


def sqlite_file(url: str | URL) -> Path | None:
    """The file of an SQLite URL (None for other databases and for in-memory SQLite)."""
    parsed = database_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" \
            or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def prepare_database(url: str | URL) -> None:
    """Before the first engine opens it: an SQLite file's directory exists and the file is in WAL
    mode (a property of the file, so every process and every later connection has it)."""
    path = sqlite_file(url)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def engine_options(url: str | URL) -> dict[str, Any]:
    """Keyword arguments of `sqlalchemy.create_engine` for `url`: SQLite's busy timeout (a connect
    argument, so it survives pickling an Optuna storage), or PostgreSQL's pool settings."""
    if database_url(url).get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}}
    return dict(POSTGRES_POOL)


def sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection SQLite settings: foreign keys enforced, as PostgreSQL does (WAL is the file's,
    the busy timeout the connect argument's: engine_options)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# SQLite errors after which a connection stays broken even once the file is fine again: a connection
# that met an unwritable file was opened (or fell back to) read-only, one that met an I/O error may
# keep a stale view. Treated as disconnects, so the pool drops the connection and a retry opens anew.
SQLITE_BROKEN_CONNECTION = ("readonly database", "disk i/o error", "unable to open database file")


def _sqlite_error_drops_connection(context: Any) -> None:
    error = context.original_exception
    if isinstance(error, sqlite3.Error) and any(
        text in str(error).lower() for text in SQLITE_BROKEN_CONNECTION
    ):
        context.is_disconnect = True


def configure_engine(engine: Engine) -> None:
    """Attach the SQLite connect settings and error handling to `engine` (no-op for other databases)."""
    if engine.dialect.name != "sqlite":
        return
    if not event.contains(engine, "connect", sqlite_on_connect):
        event.listen(engine, "connect", sqlite_on_connect)
    if not event.contains(engine, "handle_error", _sqlite_error_drops_connection):
        event.listen(engine, "handle_error", _sqlite_error_drops_connection)


# --- BEGIN IMMEDIATE for writes --------------------------------------------------------------------

_writing = threading.local()


@contextlib.contextmanager
def _write_transaction(active: bool) -> Iterator[None]:
    previous = getattr(_writing, "active", False)
    _writing.active = active
    try:
        yield
    finally:
        _writing.active = previous


def _driver_autocommit(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # pysqlite must not issue its own (deferred) BEGIN


def _begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE" if getattr(_writing, "active", False) else "BEGIN")


def serialise_sqlite_writes(storage: BaseStorage) -> None:
    """Make every writing transaction of an SQLite RDBStorage `BEGIN IMMEDIATE` (no-op elsewhere).

    pysqlite runs a SELECT outside any transaction and opens one only at the first write, so
    Optuna's read-check-write steps are not atomic on SQLite: two processes popping the same
    enqueued (WAITING) trial both see it waiting and both take it (measured: 12 of 64 enqueued
    trials run twice by 8 workers). With BEGIN IMMEDIATE a writing call holds SQLite's write lock
    from its first read, and a waiting writer is queued by the busy timeout instead of failing with
    "database is locked". Reading calls begin a plain (deferred) transaction: under WAL they see one
    snapshot and never wait for writers.
    """
    if not isinstance(storage, RDBStorage) or storage.engine.dialect.name != "sqlite":
        return
    engine = storage.engine
    if not event.contains(engine, "begin", _begin):
        event.listen(engine, "connect", _driver_autocommit)
        configure_engine(engine)
        event.listen(engine, "begin", _begin)
        engine.dispose()  # pooled connections were opened without the listeners


# --- retries ---------------------------------------------------------------------------------------

def is_transient(error: BaseException) -> bool:
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

    def delay(self, attempt: int) -> float:
        return min(self.max_delay_s, self.base_delay_s * 2**attempt) * (0.5 + random.random())

    def count(self) -> None:
        with self._lock:
            self.retries += 1

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        for attempt in range(self.attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as error:
                if not is_transient(error) or attempt == self.attempts - 1:
                    raise
                self.count()
                delay = self.delay(attempt)
                logger.debug("storage busy (%s); retry %d in %.2fs", error, attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


class RetryingStorage(BaseStorage):
    """An Optuna storage that retries transient database errors (locked, busy, disconnected), and on
    SQLite begins its writing calls IMMEDIATE (serialise_sqlite_writes).

    Every call is one transaction in the wrapped RDBStorage and is rolled back on error, so a
    retry re-runs it from a clean state. The object pickles like the storage it wraps.

    `cache_trials`: reads go through Optuna's trial cache (the one `optuna.create_study` puts in
    front of an RDBStorage: a finished trial, which the database no longer lets anyone change, is
    read once; each later read fetches only the unfinished and the new trials). Without it every
    `get_all_trials` loads the whole study, and a trial reads it three times (TPE's search space,
    TPE's sampling, the latency cache): 24.6 s of 40 one-shot candidates' 57.2 s (docs/workers.md).
    The cache lives as long as this object and grows with the trials read (unpickling starts an
    empty one), so it suits the processes that run a search's trials, not the long-running API
    server.
    """

    def __init__(self, storage: BaseStorage, policy: RetryPolicy | None = None, *,
                 cache_trials: bool = False) -> None:
        self._wrap(storage, policy or RetryPolicy(), cache_trials)

    def _wrap(self, storage: BaseStorage, policy: RetryPolicy, cache_trials: bool) -> None:
        self.backend = storage
        self.cache_trials = cache_trials and isinstance(storage, RDBStorage)
        # optuna.storages.get_storage puts Optuna's trial cache in front of an RDBStorage
        self.storage = optuna.storages.get_storage(storage) if self.cache_trials else storage
        self.policy = policy
        serialise_sqlite_writes(storage)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        with _write_transaction(name.startswith(WRITE_METHODS)):
            return self.policy.call(getattr(self.storage, name), *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {"storage": self.backend, "attempts": self.policy.attempts, "cache_trials": self.cache_trials}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # the unpickled storage has a new engine (serialise_sqlite_writes again), and an empty cache
        self._wrap(state["storage"], RetryPolicy(attempts=state["attempts"]),
                   state.get("cache_trials", False))

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
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._call("get_all_trials", study_id, deepcopy, states)

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self._call("get_n_trials", study_id, state)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._call("get_best_trial", study_id)

    def remove_session(self) -> None:
        self.backend.remove_session()

    def close(self) -> None:
        """Give the database connections back (a Ray worker process runs many tasks: each task's
        storage must not keep its pool open, or PostgreSQL runs out of connections)."""
        self.backend.remove_session()
        if isinstance(self.backend, RDBStorage):
            self.backend.engine.dispose()


def open_storage(url: str, policy: RetryPolicy | None = None, *,
                 cache_trials: bool = False) -> RetryingStorage:
    """The Optuna storage at `url`: SQLite files in WAL mode with the busy timeout and writes begun
    IMMEDIATE, PostgreSQL with its pool settings; behind bounded retries; `cache_trials`: finished
    trials read once (RetryingStorage), for the processes that run trials.

    Opening is retried too: RDBStorage creates its tables and its version row on first use, and
    two processes doing so at once on a fresh database collide ("table ... already exists", a
    duplicate alembic_version row); the next try finds them. ValueError for a malformed URL.
    """
    options = engine_options(url)  # ValueError for a malformed URL, before anything is created
    policy = policy or RetryPolicy()
    for attempt in range(policy.attempts):
        try:
            prepare_database(url)
            storage = RDBStorage(url, engine_kwargs=options)
            break
        except (sa_exc.OperationalError, sa_exc.IntegrityError, sqlite3.OperationalError,
                optuna.exceptions.StorageInternalError):
            if attempt == policy.attempts - 1:
                raise
            policy.count()
            time.sleep(policy.delay(attempt))
    return RetryingStorage(storage, policy, cache_trials=cache_trials)


def as_storage(storage: str | BaseStorage) -> BaseStorage:
    """A storage object: `storage` itself, or the storage at that URL (open_storage)."""
    return open_storage(storage) if isinstance(storage, str) else storage


__all__ = [
    "POSTGRES_POOL",
    "SQLITE_BUSY_TIMEOUT_S",
    "RetryPolicy",
    "RetryingStorage",
    "as_storage",
    "configure_engine",
    "database_url",
    "engine_options",
    "is_transient",
    "open_storage",
    "prepare_database",
    "serialise_sqlite_writes",
    "sqlite_file",
    "sqlite_on_connect",
]
