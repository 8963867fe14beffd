"""The dispatcher with a stand-in runner: cancel travels as the row's status only, a run's RunReport
becomes the search's status and summary, and the runner finds the config in the study."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from search_spaces.run import Outcome, RunReport
from search_spaces.study import load_study, study_config
from service import crud
from service.app import create_app
from service.core.settings import Settings
from service.runtime import Runtime, build_runtime
from service.searches.dispatcher import Dispatcher

LEASE_S = 300.0  # leases are renewed every 100 s: a cancel seen sooner was seen by the status poll
POLL_S = 0.05


class StandInRunner:
    """Called like workers.ray_runner.run_search; ends with `outcome` once released, or
    "cancelled" as soon as should_cancel() says so."""

    def __init__(self, outcome: Outcome = "done", last_error: str | None = None) -> None:
        self.outcome = outcome
        self.last_error = last_error
        self.started = threading.Event()
        self.release = threading.Event()
        self.cancel_seen_at: float | None = None
        self.configs: list[Any] = []

    def __call__(self, study_name: str, storage_url: str, *, artifact_dir: str, ray_address: str | None,
                 should_cancel: Callable[[], bool]) -> RunReport:
        self.configs.append(study_config(load_study(study_name, storage_url)))
        self.started.set()
        outcome: Outcome = self.outcome
        deadline = time.monotonic() + 60
        while not self.release.is_set():
            if should_cancel():
                self.cancel_seen_at, outcome = time.monotonic(), "cancelled"
                break
            if time.monotonic() > deadline:
                raise AssertionError("the stand-in runner was neither released nor cancelled in 60 s")
            time.sleep(0.01)
        counts = {"complete": 0, "pruned": 0, "fail": 3 if outcome == "failing" else 0, "running": 0,
                  "waiting": 0}
        return RunReport(outcome=outcome, runner="ray", study_name=study_name, trials_requested=3,
                         finished=0, counts=counts, ran=3, crashed=counts["fail"],
                         last_error=self.last_error, elapsed_s=0.1, run_id="r1", duplicate_claims=0)


@dataclasses.dataclass
class Setup:
    client: TestClient
    runtime: Runtime
    headers: dict[str, str]

    def dispatch(self, runner: StandInRunner) -> Dispatcher:
        settings = self.runtime.settings.model_copy(update={"concurrent_searches": 1})
        dispatcher = Dispatcher(dataclasses.replace(self.runtime, settings=settings), runner=runner)
        dispatcher.start()
        return dispatcher

    def wait_status(self, search: dict[str, Any], wanted: str, timeout_s: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            body = self.client.get(search["links"]["self"], headers=self.headers).json()
            if body["status"] == wanted:
                return body
            assert time.monotonic() < deadline, f"the search never became {wanted}: {body}"
            time.sleep(0.02)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """An app without its own dispatcher over a database of this test only (a dispatcher takes any
    queued search there)."""
    settings = Settings(data_dir=tmp_path, concurrent_searches=0, lease_s=LEASE_S, dispatcher_poll_s=POLL_S)
    runtime = build_runtime(settings)
    with runtime.sessions() as session:
        _, token = crud.create_user(session, name="alice")
        session.commit()
    with TestClient(create_app(settings, runtime=runtime)) as client:
        yield Setup(client, runtime, {"Authorization": f"Bearer {token}"})
    runtime.close()


def _submit(setup: Setup) -> dict[str, Any]:
    response = setup.client.post("/api/v1/searches", headers=setup.headers,
                                 json={"space": "quick", "dataset": {"name": "digits"}, "trials": 3})
    assert response.status_code == 201, response.text
    return response.json()


def test_cancel_is_the_rows_status_polled_by_the_dispatcher(setup: Setup) -> None:
    runner = StandInRunner()
    dispatcher = setup.dispatch(runner)
    try:
        search = _submit(setup)
        assert runner.started.wait(30), "the dispatcher never ran the search"
        cancelled_at = time.monotonic()
        answer = setup.client.post(f"{search['links']['self']}/cancel", headers=setup.headers).json()
        assert answer["status"] == "cancelling"
        body = setup.wait_status(search, "cancelled")
    finally:
        dispatcher.stop()
    assert runner.cancel_seen_at is not None and runner.cancel_seen_at - cancelled_at < LEASE_S / 3
    assert body["summary"]["outcome"] == "cancelled"
    # the runner read the config from the study (its one copy); the API wrote no cancel attr there
    assert runner.configs[0].trials == 3 and runner.configs[0].study_name == search["study_name"]
    study = optuna.load_study(study_name=search["study_name"], storage=setup.runtime.storage)
    assert not [key for key in study.user_attrs if key.startswith("spsa_nas:cancel")]


def test_a_run_whose_trials_kept_failing_fails_the_search_with_the_error(setup: Setup) -> None:
    runner = StandInRunner(outcome="failing", last_error="DataError: no images")
    runner.release.set()
    dispatcher = setup.dispatch(runner)
    try:
        body = setup.wait_status(_submit(setup), "failed")
    finally:
        dispatcher.stop()
    assert body["error"] == "RuntimeError: trials kept failing; last error: DataError: no images"
    report = RunReport.model_validate(body["summary"])  # the summary is the run's RunReport
    assert report.outcome == "failing" and report.last_error == "DataError: no images"


def test_a_finished_run_completes_the_search_with_its_report(setup: Setup) -> None:
    runner = StandInRunner(outcome="done")
    runner.release.set()
    dispatcher = setup.dispatch(runner)
    try:
        body = setup.wait_status(_submit(setup), "completed")
    finally:
        dispatcher.stop()
    assert RunReport.model_validate(body["summary"]).outcome == "done"
    assert body["config"]["trials"] == 3 and body["config"]["study_name"] == body["study_name"]


def test_a_database_error_recording_the_end_is_logged_and_retried(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real, calls = crud.finish_search, []

    def flaky_finish(*args: Any, **kwargs: Any) -> bool:
        calls.append(kwargs["status"])
        if len(calls) <= 2:
            raise OperationalError("UPDATE searches", {}, Exception("server closed the connection"))
        return real(*args, **kwargs)

    monkeypatch.setattr(crud, "finish_search", flaky_finish)
    monkeypatch.setattr("service.searches.dispatcher.RECORD_BACKOFF_S", (0.01,))
    runner = StandInRunner(outcome="done")
    runner.release.set()
    dispatcher = setup.dispatch(runner)
    try:
        body = setup.wait_status(_submit(setup), "completed")
        second = setup.wait_status(_submit(setup), "completed")  # the thread lived on
    finally:
        dispatcher.stop()
    assert calls[:3] == ["completed"] * 3 and body["summary"] and second["summary"]
    assert "cannot record the end (completed)" in caplog.text


def test_a_database_error_during_the_run_releases_the_search_instead_of_failing_it(setup: Setup) -> None:
    class OutageOnce(StandInRunner):
        def __call__(self, *args: Any, **kwargs: Any) -> RunReport:
            if not self.configs:
                self.configs.append(None)
                raise OperationalError("SELECT", {}, Exception("terminating connection"))
            return super().__call__(*args, **kwargs)

    runner = OutageOnce(outcome="done")
    runner.release.set()
    dispatcher = setup.dispatch(runner)
    try:
        body = setup.wait_status(_submit(setup), "completed")  # released, claimed again, finished
    finally:
        dispatcher.stop()
    assert body["error"] is None and len(runner.configs) == 2


def test_a_search_taken_over_mid_run_is_not_finished_by_its_old_holder(setup: Setup) -> None:
    """Fencing: once another coordinator holds the search (a new claim, a new token), what the old
    holder reports at its end changes nothing."""
    from service.core.models import Search

    runner = StandInRunner(outcome="done")
    dispatcher = setup.dispatch(runner)
    search = _submit(setup)
    try:
        assert runner.started.wait(30), "the dispatcher never ran the search"
        with setup.runtime.sessions() as session:  # what a takeover after a stall writes
            row = session.get(Search, search["id"])
            assert row is not None and row.lease_owner == dispatcher.owner
            row.lease_owner, row.lease_token = "another-coordinator", row.lease_token + 1
            session.commit()
        runner.release.set()  # the stalled holder's run ends and tries to record it
    finally:
        dispatcher.stop()  # joins its threads: whatever it was going to write is written
    with setup.runtime.sessions() as session:
        row = session.get(Search, search["id"])
        assert row is not None
        assert (row.status, row.lease_owner, row.result) == ("running", "another-coordinator", None)


def test_a_finished_search_keeps_only_the_weights_of_its_pareto_front(setup: Setup) -> None:
    from optuna.artifacts import upload_artifact

    search = _submit(setup)
    study = optuna.load_study(study_name=search["study_name"], storage=setup.runtime.storage)
    files = {}
    for values in ((0.9, 2.0), (0.5, 3.0), (0.8, 1.0)):  # the second is dominated by both others
        trial = study.ask()
        weights = setup.runtime.settings.data_dir / f"w{trial.number}.bin"
        weights.write_bytes(b"weights")
        artifact = upload_artifact(
            artifact_store=setup.runtime.artifact_store, file_path=str(weights), study_or_trial=trial
        )
        attrs = {"weights_artifact": artifact, "val_acc": values[0], "latency_ms": values[1]}
        for key, value in attrs.items():  # what a trial records (the front is read from these)
            trial.set_user_attr(key, value)
        study.tell(trial, list(values))
        files[trial.number] = setup.runtime.settings.artifact_path / artifact
    runner = StandInRunner(outcome="done")
    runner.release.set()
    dispatcher = setup.dispatch(runner)
    try:
        setup.wait_status(search, "completed")
        deadline = time.monotonic() + 30  # the pruning follows the recorded end
        while files[1].exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        dispatcher.stop()
    assert not files[1].exists()  # dominated: its weights are gone
    assert files[0].is_file() and files[2].is_file()  # the Pareto front keeps them


def test_a_completed_search_stores_its_best_models_attention_maps(setup: Setup) -> None:
    import io

    from optuna.artifacts import download_artifact, upload_artifact
    from PIL import Image

    from tests.service.conftest import tiny_model_files, tiny_spec
    from workers.maps_job import ATTENTION_MAP_ATTR

    search = _submit(setup)
    study = optuna.load_study(study_name=search["study_name"], storage=setup.runtime.storage)
    weights_file = setup.runtime.settings.data_dir / "w.safetensors"
    weights_file.write_bytes(tiny_model_files()[0])  # real weights of a model with SPSA in stage 1
    for values in ((0.9, 2.0), (0.5, 3.0)):
        trial = study.ask()
        artifact = upload_artifact(artifact_store=setup.runtime.artifact_store, file_path=str(weights_file),
                                   study_or_trial=trial)
        attrs = {"weights_artifact": artifact, "val_acc": values[0], "latency_ms": values[1],
                 "spec": tiny_spec(), "feasible": True}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        study.tell(trial, list(values))
    runner = StandInRunner(outcome="done")
    runner.release.set()
    dispatcher = setup.dispatch(runner)
    try:
        setup.wait_status(search, "completed")
        deadline = time.monotonic() + 600  # drawn after the end is recorded (the first may build a kernel)
        while ATTENTION_MAP_ATTR not in study.user_attrs and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        dispatcher.stop()
    record = study.user_attrs.get(ATTENTION_MAP_ATTR)
    assert record is not None and record["trial"] == 0, record  # the best trial's
    out = setup.runtime.settings.data_dir / "map.png"
    download_artifact(artifact_store=setup.runtime.artifact_store, file_path=str(out),
                      artifact_id=record["artifact_id"])
    assert Image.open(io.BytesIO(out.read_bytes())).format == "PNG"


def test_a_full_disk_stops_running_searches_cleanly_for_resumption(setup: Setup) -> None:
    from service.core.models import Search

    runner = StandInRunner(outcome="done")
    dispatcher = setup.dispatch(runner)
    search = _submit(setup)
    try:
        assert runner.started.wait(30), "the dispatcher never ran the search"
        # the disk fills up: under the threshold from now on
        dispatcher.settings = dispatcher.settings.model_copy(update={"min_free_disk_bytes": 2**62})
        deadline = time.monotonic() + 30
        while runner.cancel_seen_at is None:  # the run is told to stop
            assert time.monotonic() < deadline, "the run was not stopped"
            time.sleep(0.02)
        while True:  # and its search given back, not failed
            with setup.runtime.sessions() as session:
                row = session.get(Search, search["id"])
                assert row is not None
                if row.lease_owner is None:
                    break
            assert time.monotonic() < deadline, "the search was not released"
            time.sleep(0.02)
    finally:
        dispatcher.stop()
    assert (row.status, row.error, row.finished_at) == ("running", None, None)  # resumable

