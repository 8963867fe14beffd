"""The dispatcher's side of an on-demand re-measurement, with a stand-in for the Ray task (the real one:
test_remeasure_e2e.py): its error is recorded and answered, and a coordinator stopping mid-way gives
the request back still pending, for the next one to run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import optuna

from service.core.models import Search
from tests.service.conftest import tiny_spec
from tests.service.test_dispatcher import Setup, StandInRunner, _submit, setup  # noqa: F401


class StandInRemeasurer:
    """Called like workers.finalists.remeasure_on_ray: raises `error`, or waits for `release` (or
    should_stop()) and returns a record."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls: list[str] = []
        self.stopped = False

    def __call__(self, study_name: str, storage_url: str, *, should_stop: Callable[[], bool]) -> Any:
        self.calls.append(study_name)
        self.started.set()
        if self.error is not None:
            raise self.error
        deadline = time.monotonic() + 60
        while not self.release.is_set():
            if should_stop():
                self.stopped = True
                return None
            assert time.monotonic() < deadline, "the stand-in was neither released nor stopped in 60 s"
            time.sleep(0.01)
        return {"at": "now", "trials": {"0": {}}, "error": None}


def _completed_search(setup: Setup) -> dict[str, Any]:  # noqa: F811
    search = _submit(setup)
    study = optuna.load_study(study_name=search["study_name"], storage=setup.runtime.storage)
    attrs = {"spec": tiny_spec(), "val_acc": 0.9, "latency_ms": 2.0}
    study.add_trial(optuna.trial.create_trial(values=[0.9, 2.0], user_attrs=attrs))
    runner = StandInRunner(outcome="done")
    runner.release.set()
    dispatcher = setup.dispatch(runner)
    try:
        setup.wait_status(search, "completed")
    finally:
        dispatcher.stop()
    return search


def _dispatch(setup: Setup, remeasurer: StandInRemeasurer) -> Any:  # noqa: F811
    import dataclasses

    from service.searches.dispatcher import Dispatcher

    settings = setup.runtime.settings.model_copy(update={"concurrent_searches": 1})
    dispatcher = Dispatcher(dataclasses.replace(setup.runtime, settings=settings), runner=StandInRunner(),
                            remeasurer=remeasurer)
    dispatcher.start()
    return dispatcher


def _wait_state(setup: Setup, search: dict[str, Any], states: tuple[str, ...]) -> dict[str, Any]:  # noqa: F811
    deadline = time.monotonic() + 30
    while True:
        body = setup.client.get(search["links"]["self"], headers=setup.headers).json()["remeasure"]
        if body["state"] in states:
            return body
        assert time.monotonic() < deadline, f"the re-measurement never became {states}: {body}"
        time.sleep(0.02)


def test_a_failed_remeasurement_is_recorded_with_its_error(setup: Setup) -> None:  # noqa: F811
    search = _completed_search(setup)
    assert setup.client.post(f"{search['links']['self']}/remeasure", headers=setup.headers).status_code == 202
    remeasurer = StandInRemeasurer(error=RuntimeError("no latency lock"))
    dispatcher = _dispatch(setup, remeasurer)
    try:
        state = _wait_state(setup, search, ("failed", "done"))
    finally:
        dispatcher.stop()
    assert state["state"] == "failed" and state["error"] == "RuntimeError: no latency lock"
    assert state["count"] == 1 and remeasurer.calls == [search["study_name"]]
    # the request was cleared: a new one may be made
    assert setup.client.post(f"{search['links']['self']}/remeasure", headers=setup.headers).status_code == 202


def test_a_coordinator_stopping_gives_the_request_back_pending(setup: Setup) -> None:  # noqa: F811
    search = _completed_search(setup)
    assert setup.client.post(f"{search['links']['self']}/remeasure", headers=setup.headers).status_code == 202
    first = StandInRemeasurer()
    dispatcher = _dispatch(setup, first)
    try:
        assert first.started.wait(30), "the dispatcher never took the request"
        assert _wait_state(setup, search, ("running",))["state"] == "running"
    finally:
        dispatcher.stop()
    assert first.stopped
    with setup.runtime.sessions() as session:
        row = session.get(Search, search["id"])
        assert row is not None and row.remeasure_requested_at is not None and row.remeasure_owner is None
    assert _wait_state(setup, search, ("pending",))["count"] == 0

    second = StandInRemeasurer()
    second.release.set()
    dispatcher = _dispatch(setup, second)  # the next coordinator runs it at once
    try:
        state = _wait_state(setup, search, ("done", "failed"))
    finally:
        dispatcher.stop()
    assert state["state"] == "done" and state["error"] is None and state["count"] == 1
    assert second.calls == [search["study_name"]]
