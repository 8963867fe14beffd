"""The trial cache of the storage that runs trials (open_storage(cache_trials=True)), on SQLite and
PostgreSQL: a finished trial is read once, every other change another process makes is seen."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import text

from search_spaces.storage import RetryingStorage, open_storage


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    return request.getfixturevalue("postgres_url")


def _attr(storage: RetryingStorage, study_id: int, number: int) -> object:
    trials = {t.number: t for t in storage.get_all_trials(study_id)}
    return trials[number].user_attrs["k"]


def test_a_finished_trial_is_read_once_and_every_other_change_is_seen(db_url: str) -> None:
    writer = open_storage(db_url)  # another process: the runner, a worker
    study = optuna.create_study(storage=writer, study_name="s", direction="maximize")
    for value in (0.1, 0.2, 0.3):
        trial = study.ask()
        trial.set_user_attr("k", 1)
        study.tell(trial, value)
    running = study.ask()
    running.set_user_attr("k", 1)

    cached = open_storage(db_url, cache_trials=True)
    plain = open_storage(db_url)  # the API server's: no cache
    assert cached.cache_trials and not plain.cache_trials
    study_id = cached.get_study_id_from_name("s")
    states = [t.state for t in cached.get_all_trials(study_id)]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.RUNNING]

    # behind every storage's back, the finished trial 0's attribute changes in the database: the
    # cached storage still serves the trial it read, the plain one reads it anew
    first_id = cached.get_trial_id_from_study_id_trial_number(study_id, 0)
    with cached.backend.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(text("UPDATE trial_user_attributes SET value_json = '2' "
                          "WHERE trial_id = :t AND key = 'k'"), {"t": first_id})
    assert _attr(cached, study_id, 0) == 1
    assert _attr(plain, study_id, 0) == 2

    # what the runner and the workers change is seen: a running trial finishing, a new trial
    running.set_user_attr("k", 3)
    study.tell(running, 0.4)
    study.enqueue_trial({})
    trials = cached.get_all_trials(study_id)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4 + [TrialState.WAITING]
    assert trials[3].user_attrs["k"] == 3 and trials[3].values == [0.4]
    assert cached.get_n_trials(study_id, TrialState.COMPLETE) == 4

    # a Ray task's copy: caching, with an empty cache (it reads the database anew), no trials pickled
    copy = pickle.loads(pickle.dumps(cached))
    assert copy.cache_trials and _attr(copy, study_id, 0) == 2
    assert b"value_json" not in pickle.dumps(cached) and len(pickle.dumps(cached)) < 4096
    for storage in (copy, cached, plain, writer):
        storage.close()


# --- trial tasks' storages, kept between the tasks of a worker process (workers.ray_runner) ------

def _finish(storage: RetryingStorage, name: str, n: int, value: float = 0.5) -> None:
    study = optuna.load_study(study_name=name, storage=storage)
    for _ in range(n):
        trial = study.ask()
        trial.set_user_attr("k", value)
        study.tell(trial, value)


def _values(storage: RetryingStorage, name: str) -> list[float | None]:
    study_id = storage.get_study_id_from_name(name)
    return [t.value for t in storage.get_all_trials(study_id)]


def test_a_task_storage_is_kept_between_tasks_and_sees_what_others_wrote(db_url: str) -> None:
    from workers import ray_runner

    writer = open_storage(db_url)
    optuna.create_study(storage=writer, study_name="kept", direction="maximize")
    _finish(writer, "kept", 2)
    ray_runner._task_storages.clear()
    first = ray_runner.task_storage(db_url, "kept")
    assert _values(first, "kept") == [0.5, 0.5]
    first.close()  # a task's end: its connections given back, the object and its trial cache kept
    _finish(writer, "kept", 1, 0.7)  # another task, elsewhere
    second = ray_runner.task_storage(db_url, "kept")
    assert second is first
    assert _values(second, "kept") == [0.5, 0.5, 0.7]  # reconnected; the new trial read
    _finish(second, "kept", 1, 0.9)  # and it writes
    assert _values(writer, "kept") == [0.5, 0.5, 0.7, 0.9]
    second.close()


def test_a_study_recreated_under_its_name_gets_a_new_task_storage(db_url: str) -> None:
    """SQLite gives a deleted study's id (and its trials' ids) to the next ones created: a storage
    kept for the old study would serve its finished trials, from its cache, as the new study's."""
    from workers import ray_runner

    writer = open_storage(db_url)
    optuna.create_study(storage=writer, study_name="again", direction="maximize")
    _finish(writer, "again", 3, 0.1)
    ray_runner._task_storages.clear()
    old = ray_runner.task_storage(db_url, "again")
    assert _values(old, "again") == [0.1, 0.1, 0.1]
    old.close()
    old_id = writer.get_study_id_from_name("again")
    optuna.delete_study(study_name="again", storage=writer)
    optuna.create_study(storage=writer, study_name="again", direction="maximize")
    if db_url.startswith("sqlite"):
        assert writer.get_study_id_from_name("again") == old_id  # the case this guards against
    _finish(writer, "again", 1, 0.8)
    new = ray_runner.task_storage(db_url, "again")
    assert new is not old
    assert _values(new, "again") == [0.8]
    new.close()


def test_task_storages_kept_are_bounded(db_url: str) -> None:
    from workers import ray_runner

    writer = open_storage(db_url)
    names = [f"s{i}" for i in range(ray_runner.TASK_STORAGES_KEPT + 1)]
    for name in names:
        optuna.create_study(storage=writer, study_name=name, direction="maximize")
    ray_runner._task_storages.clear()
    storages = [ray_runner.task_storage(db_url, name) for name in names]
    assert len(ray_runner._task_storages) == ray_runner.TASK_STORAGES_KEPT
    assert (db_url, names[0]) not in ray_runner._task_storages  # the least recently used went
    assert ray_runner.task_storage(db_url, names[0]) is not storages[0]
    missing = ray_runner.task_storage(db_url, "no such study")
    with pytest.raises(KeyError):
        optuna.load_study(study_name="no such study", storage=missing)
    assert (db_url, "no such study") not in ray_runner._task_storages
    for storage in ray_runner._task_storages.values():
        storage[0].close()
    ray_runner._task_storages.clear()
