"""POST /api/v1/searches/{id}/remeasure without a coordinator: the request recorded in the row (202, one
pending per search, 409 before the end, per-user quota 429, another user's 404) and the claims a
coordinator makes on it (claim, renew, release, finish; on SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import optuna
from sqlalchemy import update

from search_spaces.finalists import remeasurement_record
from search_spaces.keys import FINALISTS_ATTR
from service import crud
from service.core.models import COMPLETED, Search
from tests.service.conftest import Service, tiny_spec

MISSING = "/api/v1/searches/00000000-0000-0000-0000-000000000000/remeasure"


def _finished(service: Service, headers: dict[str, str], *, trials: bool = True) -> dict[str, Any]:
    """A search with complete trials (a spec, figures), marked completed in its row."""
    search = service.submit(headers)
    if trials:
        study = service.study(search)
        for acc, latency in ((0.9, 3.0), (0.8, 2.0)):
            attrs = {"spec": tiny_spec(), "val_acc": acc, "latency_ms": latency}
            study.add_trial(optuna.trial.create_trial(values=[acc, latency], user_attrs=attrs))
    with service.runtime.sessions() as session:
        row = session.get(Search, search["id"])
        assert row is not None
        row.status = COMPLETED
        session.commit()
    return search


def _only_pending(service: Service, search_id: str) -> None:
    """Clear the other tests' pending requests in this shared database: claims take any row."""
    with service.runtime.sessions() as session:
        session.execute(
            update(Search)
            .where(Search.id != search_id)
            .values(remeasure_requested_at=None, remeasure_owner=None, remeasure_expires_at=None)
        )
        session.commit()


def test_a_request_is_recorded_once_and_shows_in_the_status(service: Service) -> None:
    alice, bob = service.user(), service.user()
    queued = service.submit(alice)
    early = service.client.post(f"{queued['links']['self']}/remeasure", headers=alice)
    assert early.status_code == 409 and "queued" in early.json()["detail"]

    search = _finished(service, alice)
    url = f"{search['links']['self']}/remeasure"
    assert service.client.get(search["links"]["self"], headers=alice).json()["remeasure"]["state"] == "none"
    theirs, missing = service.client.post(url, headers=bob), service.client.post(MISSING, headers=bob)
    assert theirs.status_code == missing.status_code == 404 and theirs.content == missing.content

    accepted = service.client.post(url, headers=alice)
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    assert body["remeasure"]["state"] == "pending" and body["remeasure"]["requested_at"].endswith("Z")
    assert accepted.headers["location"] == search["links"]["self"] == body["links"]["search"]
    assert body["links"]["pareto"] == f"{search['links']['self']}/pareto"
    again = service.client.post(url, headers=alice)
    assert again.status_code == 409 and "pending already" in again.json()["detail"]
    status = service.client.get(search["links"]["self"], headers=alice).json()["remeasure"]
    assert status["state"] == "pending" and status["count"] == 0

    empty = _finished(service, alice, trials=False)
    nothing = service.client.post(f"{empty['links']['self']}/remeasure", headers=alice)
    assert nothing.status_code == 409 and "nothing to re-measure" in nothing.json()["detail"]


def test_pending_requests_are_a_per_user_quota(service: Service) -> None:
    carol = service.user()
    limit = service.settings.max_pending_remeasures_per_user
    searches = [_finished(service, carol) for _ in range(limit + 1)]
    for search in searches[:limit]:
        assert service.client.post(f"{search['links']['self']}/remeasure", headers=carol).status_code == 202
    over = service.client.post(f"{searches[-1]['links']['self']}/remeasure", headers=carol)
    assert over.status_code == 429
    assert "SPSA_NAS_MAX_PENDING_REMEASURES_PER_USER" in over.json()["detail"]
    other = service.user()  # another user's quota is their own
    mine = _finished(service, other)
    assert service.client.post(f"{mine['links']['self']}/remeasure", headers=other).status_code == 202


def test_a_coordinator_claims_renews_releases_and_finishes_a_request(service: Service) -> None:
    dave = service.user()
    search = _finished(service, dave)
    assert service.client.post(f"{search['links']['self']}/remeasure", headers=dave).status_code == 202
    _only_pending(service, search["id"])
    sessions = service.runtime.sessions
    with sessions() as session:
        row = crud.claim_remeasure(session, owner="one", lease_s=60)
        assert row is not None and row.id == search["id"] and row.remeasure_owner == "one"
        # held: nobody else takes it while the lease runs
        assert crud.claim_remeasure(session, owner="two", lease_s=60) is None
        assert crud.renew_remeasure(session, search_id=search["id"], owner="one", lease_s=60)
        assert not crud.renew_remeasure(session, search_id=search["id"], owner="two", lease_s=60)
    status = service.client.get(search["links"]["self"], headers=dave).json()["remeasure"]
    assert status["state"] == "running" and status["started_at"]
    with sessions() as session:  # given back: still pending, taken again at once
        assert crud.release_remeasure(session, search_id=search["id"], owner="one")
        row = session.get(Search, search["id"])
        assert row is not None and row.remeasure_requested_at is not None and row.remeasure_owner is None
        assert not crud.finish_remeasure(session, search_id=search["id"], owner="one")  # not held
    with sessions() as session:
        row = crud.claim_remeasure(session, owner="two", lease_s=60)
        assert row is not None and row.id == search["id"]
        assert crud.finish_remeasure(session, search_id=search["id"], owner="two", error=None)
    status = service.client.get(search["links"]["self"], headers=dave).json()["remeasure"]
    assert status["state"] == "done" and status["count"] == 1 and status["finished_at"]
    assert status["requested_at"] is None
    # a new request may be made once the last one finished; a failure is answered with its error
    assert service.client.post(f"{search['links']['self']}/remeasure", headers=dave).status_code == 202
    with sessions() as session:
        row = crud.claim_remeasure(session, owner="three", lease_s=60)
        assert crud.finish_remeasure(session, search_id=search["id"], owner="three", error="RuntimeError: x")
    status = service.client.get(search["links"]["self"], headers=dave).json()["remeasure"]
    assert status["state"] == "failed" and status["error"] == "RuntimeError: x" and status["count"] == 2


def test_an_expired_claim_is_taken_over(service: Service) -> None:
    erin = service.user()
    search = _finished(service, erin)
    assert service.client.post(f"{search['links']['self']}/remeasure", headers=erin).status_code == 202
    _only_pending(service, search["id"])
    with service.runtime.sessions() as session:
        row = crud.claim_remeasure(session, owner="dead", lease_s=-1)  # expired at once
        row = crud.claim_remeasure(session, owner="alive", lease_s=60)
        assert row is not None and row.id == search["id"] and row.remeasure_owner == "alive"
        assert not crud.finish_remeasure(session, search_id=search["id"], owner="dead")
        assert crud.finish_remeasure(session, search_id=search["id"], owner="alive")


def test_a_finished_searchs_snapshot_is_reloaded_after_a_remeasurement(service: Service) -> None:
    """A finished search's study snapshot is cached for good; once a re-measurement finished (the row
    says when), /pareto and /best answer its figures, not the snapshot's."""
    fay = service.user()
    search = _finished(service, fay)
    base = search["links"]["self"]
    before = service.client.get(f"{base}/pareto", headers=fay).json()["data"]
    assert before and "latency_remeasured_ms" not in before[0]["metrics"]  # cached now, without figures
    assert service.client.post(f"{base}/remeasure", headers=fay).status_code == 202
    _only_pending(service, search["id"])
    study = service.study(search)  # what the coordinator's task writes ...
    numbers = [t.number for t in study.get_trials()]
    record = remeasurement_record({n: {"median_ms": 1.5, "figure_ms": 1.25} for n in numbers}, device="cpu",
                                  reference=None)
    study.set_user_attr(FINALISTS_ATTR, record)
    assert "latency_remeasured_ms" not in service.client.get(f"{base}/pareto", headers=fay).json()["data"][0][
        "metrics"]  # ... unseen while the request runs: the snapshot is the finished search's
    with service.runtime.sessions() as session:  # ... and its dispatcher, once it ran
        assert crud.claim_remeasure(session, owner="c", lease_s=60) is not None
        assert crud.finish_remeasure(session, search_id=search["id"], owner="c")
    after = service.client.get(f"{base}/pareto", headers=fay).json()["data"]
    assert [t["metrics"]["latency_remeasured_ms"] for t in after] == [1.25] * len(after)
    assert after[0]["metrics"]["latency_remeasured_at"] == record["at"]
    best = service.client.get(f"{base}/best", headers=fay).json()
    assert best["metrics"]["latency_remeasured_ms"] == 1.25
    assert best["tie"]["tied"][0]["latency_source"] == "remeasured"
