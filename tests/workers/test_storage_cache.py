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
