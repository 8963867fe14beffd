"""LatencyConfig.runtime over the REST API: accepted and stored with the search, a bad value or a
runtime that cannot measure the space's candidates is a 422 naming the field."""

from __future__ import annotations

import pytest

from tests.service.conftest import Service

QUICK = {"space": "quick", "dataset": {"name": "digits"}, "trials": 1}


def _problems(response: object) -> dict[tuple[str, ...], str]:
    assert response.status_code == 422, response.text  # type: ignore[attr-defined]
    return {tuple(p["loc"]): p["msg"] for p in response.json()["detail"]}  # type: ignore[attr-defined]


def test_an_unknown_runtime_is_a_422_naming_the_field(service: Service) -> None:
    response = service.client.post("/api/v1/searches", headers=service.user(),
                                    json={**QUICK, "latency": {"runtime": "tensorrt"}})
    problems = _problems(response)
    assert ("body", "latency", "runtime") in problems, problems
    assert "onnxruntime" in problems[("body", "latency", "runtime")]


@pytest.mark.parametrize(("latency", "dataset", "words"), [
    ({"runtime": "onnxruntime", "channels_last": True}, {"name": "digits"}, "channels_last applies"),
    ({"runtime": "compiled"}, {"name": "shapes"}, "cannot measure a detector"),
])
def test_a_runtime_that_cannot_measure_is_a_422(service: Service, latency: dict[str, object],
                                                dataset: dict[str, object], words: str) -> None:
    space = "detection_quick" if dataset["name"] == "shapes" else "quick"
    response = service.client.post("/api/v1/searches", headers=service.user(),
                                   json={**QUICK, "space": space, "dataset": dataset, "latency": latency})
    problems = _problems(response)
    assert any(words in msg and "latency" in " ".join(loc) + msg for loc, msg in problems.items()), problems


def test_a_runtime_is_accepted_and_stored(service: Service) -> None:
    response = service.client.post("/api/v1/searches", headers=service.user(),
                                   json={**QUICK, "latency": {"runtime": "onnxruntime"}})
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["config"]["latency"]["runtime"] == "onnxruntime", created
