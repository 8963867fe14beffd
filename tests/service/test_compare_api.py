"""GET /api/v1/searches/{id}/compare: the owner gets the ablation table of their search (so far, while it
is not finished), another user and an unknown id get the same 404."""

from __future__ import annotations

import json
from typing import Any

import optuna
import pytest

from search_spaces.compare import compare_study
from service.core.models import COMPLETED, Search
from tests.service.conftest import Service, tiny_spec

MISSING = "/api/v1/searches/00000000-0000-0000-0000-000000000000/compare"


def _add(study: optuna.Study, stage: dict[str, Any], acc: float, latency: float) -> None:
    attrs = {"spec": tiny_spec(**stage), "val_acc": acc, "latency_ms": latency, "top1": acc}
    study.add_trial(optuna.trial.create_trial(values=[acc, latency], user_attrs=attrs))


def _filled(service: Service, headers: dict[str, str]) -> tuple[dict[str, Any], optuna.Study]:
    search = service.submit(headers)
    study = service.study(search)
    _add(study, {"spsa": True}, 0.9, 3.0)
    _add(study, {"spsa": True, "spsa_reverse": False}, 0.7, 3.5)
    _add(study, {"spsa": False, "channel_attn": "eca"}, 0.6, 2.0)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    return search, study


def test_the_owner_gets_the_table_others_and_unknown_ids_404(service: Service) -> None:
    alice, bob = service.user(), service.user()
    search, study = _filled(service, alice)
    url = f"{search['links']['self']}/compare"

    response = service.client.get(url, headers=alice)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["search_id"] == search["id"] and body["status"] == "queued" and body["finished"] is False
    assert body["counts"]["summarised"] == 3 and body["counts"]["fail"] == 1
    cells = {(c["dimension"], c["scope"], c["choice"]): c for c in body["cells"]}
    spsa = cells[("spatial_attn", "stage 1", "spsa")]
    assert spsa["n"] == 2 and spsa["trials"] == [0, 1]
    assert spsa["val_acc_mean"] == pytest.approx(0.8) and spsa["latency_ms_mean"] == pytest.approx(3.25)
    assert cells[("spsa_reverse", "stage 1", "off")]["trials"] == [1]
    assert cells[("spatial_attn", "stage 1", "none")]["trials"] == [2]
    # stages 2..4 of tiny_spec have no attention: every trial is `none` there
    assert cells[("spatial_attn", "stage 2", "none")]["n"] == 3
    assert ("spsa_reverse", "stage 2", "on") not in cells
    assert body["cells"] == json.loads(json.dumps(compare_study(study)["cells"]))

    theirs = service.client.get(url, headers=bob)
    missing = service.client.get(MISSING, headers=bob)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.content == missing.content
    assert service.client.get(url).status_code == 401

    with service.runtime.sessions() as session:  # once it is over, the answer says so
        row = session.get(Search, search["id"])
        assert row is not None
        row.status = COMPLETED
        session.commit()
    done = service.client.get(url, headers=alice).json()
    assert done["finished"] is True and done["status"] == "completed"
