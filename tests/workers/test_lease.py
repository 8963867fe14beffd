"""Leases without Ray: retries on a locked SQLite file, the heartbeat thread, stale detection, the gate."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from workers_test_utils import open_and_list

from search_spaces.keys import HEARTBEAT_ATTR, run_cancel_attr
from search_spaces.storage import RetryingStorage, RetryPolicy
from workers.latency_gate import NodeGate
from workers.lease import Heartbeat, LeaseTracker

CANCEL_ATTR = run_cancel_attr("run-1")  # what the coordinator of run "run-1" writes to cancel it


def _study(url: str, *, timeout_s: float = 60.0) -> tuple[optuna.Study, RetryingStorage]:
    storage = RetryingStorage(RDBStorage(url, engine_kwargs={"connect_args": {"timeout": timeout_s}}),
                              RetryPolicy(attempts=40, base_delay_s=0.02, max_delay_s=0.2))
    study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True)
    return study, storage


def test_retrying_storage_rides_out_a_locked_sqlite_file(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    study, storage = _study(f"sqlite:///{db}", timeout_s=0.01)  # the driver gives up at once
    trial = study.ask()
    holder = sqlite3.connect(db, timeout=5, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # nobody else can write (or read, outside WAL) meanwhile
    release = threading.Timer(0.5, lambda: holder.execute("COMMIT"))
    release.start()
    storage.set_trial_user_attr(trial._trial_id, "k", 1)
    release.join()
    holder.close()
    assert storage.policy.retries > 0
    assert storage.get_trial(trial._trial_id).user_attrs["k"] == 1


def test_processes_opening_a_fresh_database_at_once_do_not_collide(tmp_path: Path) -> None:
    """Six processes open one new SQLite file at once: without retries some fail creating the
    schema ("table already exists", duplicate alembic_version row)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(6) as pool:
        for round_ in range(3):
            url = f"sqlite:///{tmp_path / f'fresh{round_}.db'}"
            retries = pool.map(open_and_list, [url] * 6)  # raises if any of them failed
            assert len(retries) == 6  # every process opened it
            assert optuna.storages.RDBStorage(url).get_all_studies() == []  # one schema, usable


def test_retrying_storage_does_not_retry_real_errors(tmp_path: Path) -> None:
    study, storage = _study(f"sqlite:///{tmp_path / 's.db'}")
    trial = study.ask()
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_user_attr(trial._trial_id, "k", 1)
    assert storage.policy.retries == 0


def test_retrying_storage_gives_up_after_its_attempts(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    study, storage = _study(f"sqlite:///{db}", timeout_s=0.01)
    storage.policy = RetryPolicy(attempts=3, base_delay_s=0.01)
    trial = study.ask()
    holder = sqlite3.connect(db, timeout=5, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(optuna.exceptions.StorageInternalError):
            storage.set_trial_user_attr(trial._trial_id, "k", 1)
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert storage.policy.retries == 2


def test_heartbeat_refreshes_sees_cancel_and_lost_lease(tmp_path: Path) -> None:
    study, storage = _study(f"sqlite:///{tmp_path / 's.db'}")
    trial = study.ask()
    beat = Heartbeat(storage, study._study_id, trial._trial_id, 0.05, cancel_key=CANCEL_ATTR).start()
    try:
        first = storage.get_trial(trial._trial_id).user_attrs[HEARTBEAT_ATTR]["seq"]
        deadline = time.monotonic() + 30
        while storage.get_trial(trial._trial_id).user_attrs[HEARTBEAT_ATTR]["seq"] < first + 2:
            assert time.monotonic() < deadline, "the heartbeat thread did not refresh the lease"
            time.sleep(0.05)
        assert beat.stop_reason is None
        study.set_user_attr(CANCEL_ATTR, True)
        while beat.stop_reason is None:
            assert time.monotonic() < deadline, "the heartbeat did not see the cancel flag"
            time.sleep(0.05)
        assert beat.stop_reason == "cancelled"
    finally:
        beat.close()

    study.set_user_attr(CANCEL_ATTR, False)
    other = study.ask()
    lost = Heartbeat(storage, study._study_id, other._trial_id, 0.05).start()
    storage.set_trial_state_values(other._trial_id, TrialState.FAIL)  # the coordinator's verdict
    try:
        deadline = time.monotonic() + 30
        while lost.stop_reason is None:
            assert time.monotonic() < deadline, "the heartbeat did not notice its trial was failed"
            time.sleep(0.05)
        assert lost.stop_reason == "lease lost"
    finally:
        lost.close()


def test_lease_tracker_flags_only_trials_whose_heartbeat_stood_still(tmp_path: Path) -> None:
    study, storage = _study(f"sqlite:///{tmp_path / 's.db'}")
    alive, dead, silent = study.ask(), study.ask(), study.ask()
    tracker = LeaseTracker(lease_s=10)

    def running() -> list[optuna.trial.FrozenTrial]:
        return study.get_trials(states=(TrialState.RUNNING,))

    for trial in (alive, dead):
        storage.set_trial_user_attr(trial._trial_id, HEARTBEAT_ATTR, {"seq": 1, "time": 0})
    assert tracker.stale(running(), now=0.0) == []
    storage.set_trial_user_attr(alive._trial_id, HEARTBEAT_ATTR, {"seq": 2, "time": 0})
    assert tracker.stale(running(), now=9.0) == []
    storage.set_trial_user_attr(alive._trial_id, HEARTBEAT_ATTR, {"seq": 3, "time": 0})
    stale = tracker.stale(running(), now=10.5)
    assert sorted(t.number for t in stale) == [dead.number, silent.number]
    study.tell(dead, 1.0)
    study.tell(silent, 1.0)
    assert tracker.stale(running(), now=15.0) == []
    assert tracker.stale(running(), now=21.0) == [t for t in running() if t.number == alive.number]


def test_gate_serialises_measurements_and_pauses_trainers(tmp_path: Path) -> None:
    measurer, trainer = NodeGate(tmp_path), NodeGate(tmp_path)
    trainer.checkpoint()  # the trainer now holds the host (shared) until its next checkpoint
    events: list[str] = []
    entered = threading.Event()

    def measure() -> None:
        with measurer.latency_lock():
            events.append("measure start")
            entered.set()
            time.sleep(0.2)
            events.append("measure end")

    thread = threading.Thread(target=measure)
    thread.start()
    assert not entered.wait(0.3), "a measurement ran while a trainer was between checkpoints"
    events.append("trainer checkpoint")
    trainer.checkpoint()  # lets the measurement in, and waits for it to end
    events.append("trainer resumes")
    thread.join()
    trainer.close()
    assert events == ["trainer checkpoint", "measure start", "measure end", "trainer resumes"]

    other = NodeGate(tmp_path)
    with measurer.latency_lock():
        blocked = threading.Event()

        def measure_again() -> None:
            with other.latency_lock():
                blocked.set()

        second = threading.Thread(target=measure_again)
        second.start()
        assert not blocked.wait(0.3), "two measurements overlapped"
    second.join()
    assert blocked.is_set()


def test_gate_without_pausing_lets_trainers_run(tmp_path: Path) -> None:
    measurer, trainer = NodeGate(tmp_path), NodeGate(tmp_path, pause_training=False)
    with measurer.latency_lock():
        done = threading.Event()
        thread = threading.Thread(target=lambda: (trainer.checkpoint(), done.set()))
        thread.start()
        assert done.wait(10), "a trainer without pause_training waited for a measurement"
    thread.join()
