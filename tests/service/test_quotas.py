"""Quotas and fair share at submission: per-search limits (422), per-user caps (429), a full disk
(507), the cluster's resources, and the admin's priority route; the real app, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.schemas import SearchCreate
from service.app import create_app
from service.core.models import Search
from service.core.settings import Settings
from service.runtime import build_runtime
from service.searches.submit import SubmitError, check_resources
from tests.service.conftest import Service, make_settings

ServiceFactory = Callable[..., Any]


@pytest.fixture
def custom_service(
    service: Service, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., Any]]:
    """Another app on the `service` fixture's backend, with settings of the test's own."""
    opened = []

    @contextmanager
    def make(**overrides: Any) -> Iterator[Service]:
        settings = make_settings(
            service.backend, tmp_path, lambda: request.getfixturevalue("postgres_url"), **overrides
        )
        runtime = build_runtime(settings)
        opened.append(runtime)
        with TestClient(create_app(settings, runtime=runtime), raise_server_exceptions=False) as client:
            yield Service(service.backend, settings, runtime, client)

    yield make
    for runtime in opened:
        runtime.close()


def _refusals(response: Any) -> dict[tuple[str, ...], str]:
    assert response.status_code == 422, response.text
    return {tuple(problem["loc"]): problem["msg"] for problem in response.json()["detail"]}


@pytest.mark.parametrize(
    ("body", "loc", "variable"),
    [
        ({"timeout_s": 10**9}, ("body", "timeout_s"), "SPSA_NAS_MAX_SEARCH_S"),
        ({"max_retries": 100}, ("body", "max_retries"), "SPSA_NAS_MAX_TRIAL_RETRIES"),
        ({"train": {"image_size": 4096}}, ("body", "train", "image_size"), "SPSA_NAS_MAX_IMAGE_SIZE"),
        (
            {"train": {"image_size": 512, "batch_size": 256}},
            ("body", "train", "batch_size"),
            "SPSA_NAS_MAX_BATCH_PIXELS",
        ),
        ({"train": {"num_workers": 64}}, ("body", "train", "num_workers"), "SPSA_NAS_MAX_LOADER_WORKERS"),
        (
            {"dataset": {"name": "synthetic", "synthetic_samples": 1_000_000}},
            ("body", "dataset", "synthetic_samples"),
            "SPSA_NAS_MAX_SYNTHETIC_SAMPLES",
        ),
        ({"latency": {"repeats": 100_000}}, ("body", "latency", "repeats"), "SPSA_NAS_MAX_LATENCY_REPEATS"),
        ({"latency": {"warmup": 10_000}}, ("body", "latency", "warmup"), "SPSA_NAS_MAX_LATENCY_WARMUP"),
        (
            {"latency": {"min_time_s": 600}},
            ("body", "latency", "min_time_s"),
            "SPSA_NAS_MAX_LATENCY_MIN_TIME_S",
        ),
        ({"latency": {"threads": 1024}}, ("body", "latency", "threads"), "SPSA_NAS_MAX_LATENCY_THREADS"),
        ({"latency": {"max_time_s": 600}}, ("body", "latency", "max_time_s"), "SPSA_NAS_MAX_LATENCY_TIME_S"),
        (
            {"latency": {"max_warmup_s": 300}},
            ("body", "latency", "max_warmup_s"),
            "SPSA_NAS_MAX_LATENCY_WARMUP_S",
        ),
    ],
)
def test_each_per_search_quota_is_a_422_naming_field_limit_and_setting(
    service: Service, body: dict[str, Any], loc: tuple[str, ...], variable: str
) -> None:
    alice = service.user()
    response = service.client.post("/api/v1/searches", headers=alice, json={"space": "quick", **body})
    refusals = _refusals(response)
    assert loc in refusals, refusals
    setting = variable.removeprefix("SPSA_NAS_").lower()
    limit = getattr(service.settings, setting)
    assert f"quota of {int(limit) if float(limit).is_integer() else limit}" in refusals[loc]
    assert variable in refusals[loc]


def test_the_defaults_accept_the_readme_search_and_apply_the_servers_timeout(service: Service) -> None:
    alice = service.user()
    search = service.submit(alice, trials=4, train={"epochs": 1})
    assert search["config"]["timeout_s"] == service.settings.max_search_s
    given = service.submit(alice, timeout_s=60)
    assert given["config"]["timeout_s"] == 60


def test_the_schema_publishes_the_per_search_quotas(service: Service) -> None:
    schemas = service.client.get("/openapi.json").json()["components"]["schemas"]
    settings = service.settings
    assert schemas["SearchCreate"]["properties"]["max_retries"]["maximum"] == settings.max_trial_retries
    assert schemas["LatencyConfig"]["properties"]["repeats"]["maximum"] == settings.max_latency_repeats
    number = [b for b in schemas["SearchCreate"]["properties"]["timeout_s"]["anyOf"] if b["type"] == "number"]
    assert number[0]["maximum"] == settings.max_search_s
    responses = service.client.get("/openapi.json").json()["paths"]["/api/v1/searches"]["post"]["responses"]
    assert {"422", "429", "507"} <= set(responses)


def test_resources_over_what_the_cluster_has_are_refused_with_what_exists() -> None:
    body = SearchCreate.model_validate({"resources": {"num_gpus": 8, "num_cpus": 2}})
    check_resources(body, None)  # unknown: nothing to check against
    check_resources(body, {"CPU": 16, "GPU": 8})
    with pytest.raises(SubmitError) as info:
        check_resources(body, {"CPU": 1, "GPU": 0})
    assert [p.loc for p in info.value.problems] == [("resources", "num_gpus"), ("resources", "num_cpus")]
    assert "the cluster has 0 GPUs" in str(info.value) and "has 1 CPUs" in str(info.value)


def test_a_submission_is_checked_against_the_coordinators_latest_report(
    custom_service: ServiceFactory,
) -> None:
    """The API imports no Ray: it reads what a coordinator last published, while it is fresh."""
    from datetime import timedelta

    from sqlalchemy import update

    from service import crud
    from service.core.models import Coordinator, utcnow

    with custom_service() as service:
        alice = service.user()
        body = {"space": "quick", "dataset": {"name": "digits"}, "trials": 2, "resources": {"num_gpus": 8}}
        accepted = service.client.post("/api/v1/searches", headers=alice, json=body)
        assert accepted.status_code == 201, accepted.text  # no coordinator has reported: unchecked
        with service.runtime.sessions() as session:
            crud.publish_resources(session, owner="c1", resources={"CPU": 2, "GPU": 0, "memory": 8 * 2**30})
        refused = service.client.post("/api/v1/searches", headers=alice, json=body)
        assert refused.status_code == 422, refused.text
        assert "num_gpus 8 per trial: the cluster has 0 GPUs in all" in refused.text
        big = {**body, "resources": {"memory_gb": 64}}
        memory = service.client.post("/api/v1/searches", headers=alice, json=big)
        assert memory.status_code == 422 and "has 8 GB of memory" in memory.text
        with service.runtime.sessions() as session:  # the coordinator went silent: its report is stale
            stale = utcnow() - timedelta(seconds=service.settings.lease_s + 1)
            session.execute(update(Coordinator).values(seen_at=stale))
            session.commit()
        assert service.client.post("/api/v1/searches", headers=alice, json=body).status_code == 201


def test_the_active_cap_names_its_setting(custom_service: ServiceFactory) -> None:
    with custom_service(max_active_searches_per_user=2) as service:
        alice, bob = service.user(), service.user()
        for _ in range(2):
            service.submit(alice)
        refused = service.client.post("/api/v1/searches", headers=alice, json={})
        assert refused.status_code == 429
        assert "2 per user" in refused.json()["detail"]
        assert "SPSA_NAS_MAX_ACTIVE_SEARCHES_PER_USER" in refused.json()["detail"]
        service.submit(bob)  # per user: bob is not held back by alice's


def test_the_queued_cap_counts_queued_searches_only(custom_service: ServiceFactory) -> None:
    with custom_service(max_active_searches_per_user=10, max_queued_searches_per_user=2) as service:
        alice = service.user()
        first, _ = service.submit(alice), service.submit(alice)
        refused = service.client.post("/api/v1/searches", headers=alice, json={})
        assert refused.status_code == 429
        assert "2 queued per user" in refused.json()["detail"]
        assert "SPSA_NAS_MAX_QUEUED_SEARCHES_PER_USER" in refused.json()["detail"]
        with service.runtime.sessions() as session:  # one starts: a queue slot frees
            row = session.get(Search, first["id"])
            assert row is not None
            row.status = "running"
            session.commit()
        service.submit(alice)


def test_the_queued_cap_is_on_by_default(custom_service: ServiceFactory) -> None:
    # Without a setting a user still cannot fill the queue without bound (the default is finite).
    with custom_service(max_active_searches_per_user=50) as service:
        alice = service.user()
        accepted = 0
        while (answer := service.client.post("/api/v1/searches", headers=alice, json={})).status_code == 201:
            accepted += 1
            assert accepted <= 50, "no queued cap by default"
        assert answer.status_code == 429
        assert "SPSA_NAS_MAX_QUEUED_SEARCHES_PER_USER" in answer.json()["detail"]
        assert accepted == Settings.model_fields["max_queued_searches_per_user"].default


def test_the_artifact_quota_refuses_new_searches_of_that_user(custom_service: ServiceFactory) -> None:
    with custom_service(max_artifact_bytes_per_user=1000) as service:
        alice, bob = service.user(), service.user()
        search = service.submit(alice)
        service.submit(alice)  # no files yet
        service.fill(search, [(0.5, 1.0)])  # real weights: far over 1000 bytes
        refused = service.client.post("/api/v1/searches", headers=alice, json={})
        assert refused.status_code == 429
        detail = refused.json()["detail"]
        assert "quota of 1000 bytes" in detail and "SPSA_NAS_MAX_ARTIFACT_BYTES_PER_USER" in detail
        service.submit(bob)


def test_low_free_disk_refuses_new_searches_with_507(custom_service: ServiceFactory) -> None:
    with custom_service(min_free_disk_bytes=2**62) as service:
        refused = service.client.post("/api/v1/searches", headers=service.user(), json={})
        assert refused.status_code == 507
        detail = refused.json()["detail"]
        assert "SPSA_NAS_MIN_FREE_DISK_BYTES" in detail and str(2**62) in detail
        assert str(service.settings.data_dir) not in detail  # no server path in an answer


def test_only_an_admin_sets_a_priority(service: Service) -> None:
    alice, admin = service.user(), service.user(admin=True)
    search = service.submit(alice)
    path = f"/api/v1/searches/{search['id']}/priority"
    assert service.client.post(path, headers=alice, json={"priority": 5}).status_code == 403
    answer = service.client.post(path, headers=admin, json={"priority": 5})
    assert answer.status_code == 200 and answer.json()["id"] == search["id"]
    with service.runtime.sessions() as session:
        row = session.get(Search, search["id"])
        assert row is not None and row.priority == 5
    unknown = service.client.post(
        "/api/v1/searches/00000000-0000-0000-0000-000000000000/priority", headers=admin, json={"priority": 1}
    )
    assert unknown.status_code == 404
    for bad in ({"priority": 101}, {"priority": "1"}, {}):
        assert service.client.post(path, headers=admin, json=bad).status_code == 422
