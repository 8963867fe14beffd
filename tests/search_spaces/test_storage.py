"""The one storage factory: SQLite WAL and busy timeout, writes begun IMMEDIATE, reads not, pickling."""

from __future__ import annotations

import pickle
import sqlite3
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage
from sqlalchemy import create_engine, event
from sqlalchemy.exc import OperationalError

from search_spaces.storage import (
    POSTGRES_POOL,
    SQLITE_BUSY_TIMEOUT_S,
    RetryingStorage,
    RetryPolicy,
    configure_engine,
    engine_options,
    open_storage,
)
from tests.fsfaults import unwritable


def _statements(storage: RetryingStorage) -> list[str]:
    seen: list[str] = []
    assert isinstance(storage.storage, RDBStorage)
    event.listen(storage.storage.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: seen.append(statement))
    return seen


def test_sqlite_file_is_wal_with_the_one_busy_timeout(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/new/dir/db.sqlite")  # the directory is created
    optuna.create_study(storage=storage, study_name="x")
    with sqlite3.connect(tmp_path / "new" / "dir" / "db.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert isinstance(storage.storage, RDBStorage)
    with storage.storage.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_S * 1000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    storage.close()


def test_engine_options_are_the_same_for_every_engine() -> None:
    sqlite = engine_options("sqlite:///x.db")
    assert sqlite["connect_args"]["timeout"] == SQLITE_BUSY_TIMEOUT_S
    assert engine_options("postgresql+psycopg://u@h/db") == POSTGRES_POOL
    for bad in ("not a url", "://"):
        with pytest.raises(ValueError, match="not a database URL"):
            open_storage(bad)


def test_writes_begin_immediate_and_reads_do_not_wait_for_a_writer(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    storage = open_storage(f"sqlite:///{db}")
    study_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    statements = _statements(storage)
    storage.set_study_user_attr(study_id, "k", 1)
    assert "BEGIN IMMEDIATE" in statements
    statements.clear()
    assert storage.get_study_user_attrs(study_id) == {"k": 1}
    assert "BEGIN" in statements and "BEGIN IMMEDIATE" not in statements

    # Another process holds SQLite's write lock: a read through the storage still answers at once
    # (WAL); a write waits for the lock (here: a driver that gives up at once, and no retries).
    quick = RDBStorage(f"sqlite:///{db}", engine_kwargs={"connect_args": {"timeout": 0.01}})
    impatient = RetryingStorage(quick, RetryPolicy(attempts=1))
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert impatient.get_study_user_attrs(study_id) == {"k": 1}
        with pytest.raises(optuna.exceptions.StorageInternalError):
            impatient.set_study_user_attr(study_id, "k", 2)
    finally:
        holder.execute("COMMIT")
        holder.close()
    impatient.close()
    storage.close()


def test_a_pickled_storage_still_begins_writes_immediate(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    copy = pickle.loads(pickle.dumps(storage))  # what a Ray task gets
    statements = _statements(copy)
    copy.set_study_user_attr(study_id, "k", 1)
    assert "BEGIN IMMEDIATE" in statements and copy.policy.attempts == storage.policy.attempts
    copy.close()
    storage.close()


def _unwritable_error(error: BaseException | None) -> bool:
    return error is not None and any(text in str(error).lower() for text in ("readonly", "i/o error"))


def test_a_storage_writes_again_once_its_sqlite_file_is_writable_again(tmp_path: Path) -> None:
    # A connection opened while the file is unwritable is read-only for good (SQLite's fallback);
    # the pool must drop it, or every later write of this process fails although the file is fine.
    path = tmp_path / "study.db"
    url = f"sqlite:///{path}"
    policy = RetryPolicy(attempts=2, base_delay_s=0.01)
    study = optuna.create_study(study_name="s", storage=open_storage(url, policy))
    study.set_user_attr("before", 1)
    with unwritable(path):
        late = optuna.load_study(study_name="s", storage=open_storage(url, policy))  # e.g. a new worker
        assert late.user_attrs == {"before": 1}  # reads go on
        with pytest.raises(optuna.exceptions.StorageInternalError) as refused:
            late.set_user_attr("during", 2)
        assert _unwritable_error(refused.value.__cause__)
    late.set_user_attr("after", 3)
    reloaded = optuna.load_study(study_name="s", storage=url)
    assert reloaded.user_attrs == {"before": 1, "after": 3}


def test_the_service_engine_writes_again_once_its_sqlite_file_is_writable_again(tmp_path: Path) -> None:
    path = tmp_path / "service.db"
    url = f"sqlite:///{path}"
    with sqlite3.connect(path) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE t (x INTEGER)")
    engine = create_engine(url, **engine_options(url))
    configure_engine(engine)  # as service.core.db.make_engine does
    with unwritable(path):
        with engine.connect() as conn:  # the pool's first connection, opened read-only
            assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
        with pytest.raises(OperationalError) as refused, engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        assert _unwritable_error(refused.value)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (2)")
        assert conn.exec_driver_sql("SELECT x FROM t").scalars().all() == [2]
