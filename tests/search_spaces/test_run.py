"""RunReport: one typed result of a run, JSON round trip, the one line people read."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from search_spaces.run import OUTCOMES, RunReport

COUNTS = {"complete": 2, "pruned": 1, "fail": 3, "running": 0, "waiting": 0}


def _report(**overrides: object) -> RunReport:
    fields: dict[str, object] = {"outcome": "failing", "runner": "local", "study_name": "s",
                                 "trials_requested": 4, "finished": 3, "counts": COUNTS, "ran": 6,
                                 "crashed": 3, "last_error": "DataError: no images", "elapsed_s": 1.5}
    return RunReport(**{**fields, **overrides})  # type: ignore[arg-type]


def test_json_round_trip_keeps_every_field_and_drops_unset_runner_fields() -> None:
    local = _report(recovered=[1])
    assert RunReport.from_json(local.to_json()) == local
    assert "worker_lost" not in local.to_dict() and local.to_dict()["recovered"] == [1]
    ray = _report(runner="ray", outcome="done", run_id="abc", worker_lost=1, duplicate_claims=0, ray="caller")
    again = RunReport.from_json(ray.to_json())
    assert again == ray and again.worker_lost == 1 and again.duplicate_claims == 0


def test_outcome_is_one_of_the_known_names() -> None:
    assert OUTCOMES == ("done", "timeout", "cancelled", "failing")
    with pytest.raises(ValidationError, match="outcome"):
        _report(outcome="completed")  # the Ray runner's old word for done
    with pytest.raises(ValidationError, match="stopped"):
        RunReport.from_json(_report().to_json().replace('"ran"', '"stopped"'))  # no unknown fields


def test_line_and_failing() -> None:
    report = _report()
    assert report.failing and not _report(outcome="timeout").failing
    assert report.line() == "3/4 finished (2 complete, 1 pruned, 3 failed); outcome: failing"
