"""The search config's `reseed` over the REST API: accepted and echoed with the search, bad values and
values over the server's quotas a 422 naming the field (and the setting), the quotas published in the
schema, and the progress's phase while a search re-trains its top-k."""

from __future__ import annotations

from typing import Any

import pytest

from search_spaces.keys import PHASE_ATTR
from tests.service.conftest import Service

QUICK = {"space": "quick", "dataset": {"name": "digits"}, "trials": 1}


def _problems(response: Any) -> dict[tuple[str, ...], str]:
    assert response.status_code == 422, response.text
    return {tuple(p["loc"]): p["msg"] for p in response.json()["detail"]}


def test_reseed_is_accepted_echoed_and_off_by_default(service: Service) -> None:
    alice = service.user()
    search = service.submit(alice, reseed={"top_k": 2, "seeds": 3})
    assert search["config"]["reseed"] == {"top_k": 2, "seeds": 3}
    again = service.client.get(search["links"]["self"], headers=alice).json()
    assert again["config"]["reseed"] == {"top_k": 2, "seeds": 3}
    assert service.submit(alice)["config"]["reseed"] == {"top_k": 0, "seeds": 2}


@pytest.mark.parametrize(("reseed", "loc", "words"), [
    ({"seeds": 1}, ("body", "reseed", "seeds"), "greater than or equal to 2"),
    ({"top_k": -1}, ("body", "reseed", "top_k"), "greater than or equal to 0"),
    ({"top_k": "2"}, ("body", "reseed", "top_k"), "valid integer"),  # strict, as the schema says
    ({"top_k": 1, "k": 2}, ("body", "reseed", "k"), "Extra inputs"),
])
def test_a_bad_reseed_is_a_422_naming_the_field(service: Service, reseed: dict[str, Any],
                                                loc: tuple[str, ...], words: str) -> None:
    body = {**QUICK, "reseed": reseed}
    problems = _problems(service.client.post("/api/v1/searches", headers=service.user(), json=body))
    assert loc in problems and words in problems[loc], problems


def test_reseed_of_a_detection_search_is_a_422_saying_why(service: Service) -> None:
    body = {**QUICK, "space": "detection_quick", "dataset": {"name": "shapes"}, "reseed": {"top_k": 1}}
    problems = _problems(service.client.post("/api/v1/searches", headers=service.user(), json=body))
    assert any(msg.startswith("reseed.top_k: a detection search's trials are not re-trained")
               for msg in problems.values()), problems


@pytest.mark.parametrize(("reseed", "field", "variable"), [
    ({"top_k": 6}, "top_k", "SPSA_NAS_MAX_RESEED_TOP_K"),
    ({"top_k": 1, "seeds": 6}, "seeds", "SPSA_NAS_MAX_RESEED_SEEDS"),
])
def test_reseed_over_the_quota_is_a_422_naming_the_setting(service: Service, reseed: dict[str, Any],
                                                          field: str, variable: str) -> None:
    body = {**QUICK, "reseed": reseed}
    problems = _problems(service.client.post("/api/v1/searches", headers=service.user(), json=body))
    message = problems[("body", "reseed", field)]
    limit = getattr(service.settings, variable.removeprefix("SPSA_NAS_").lower())
    assert f"quota of {limit}" in message and variable in message, message
    schema = service.client.get("/openapi.json").json()["components"]["schemas"]["ReseedConfig"]
    assert schema["properties"][field]["maximum"] == limit  # published before a client sends it


def test_the_progress_says_when_the_top_k_are_retrained(service: Service) -> None:
    alice = service.user()
    search = service.submit(alice, reseed={"top_k": 1})
    service.fill(search, [(0.8, 2.0)]).set_user_attr(PHASE_ATTR, "reseed")  # as a runner leaves it
    progress = service.client.get(search["links"]["self"], headers=alice).json()["progress"]
    assert progress["phase"] == "reseed"
