"""Schemathesis fuzzing of the OpenAPI schema against the app: nothing a client sends gives a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from service import crud
from service.app import create_app
from service.core.settings import Settings
from service.runtime import Runtime, build_runtime

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    runtime = build_runtime(
        Settings(
            data_dir=tmp, concurrent_searches=0, max_trials=20, max_epochs=3, max_active_searches_per_user=50
        )
    )
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def fuzz_headers(fuzz_runtime: Runtime) -> dict[str, str]:
    with fuzz_runtime.sessions() as session:
        _, token = crud.create_user(session, name="fuzzer")
        session.commit()
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def api_schema(fuzz_runtime: Runtime) -> Any:
    app = create_app(fuzz_runtime.settings, runtime=fuzz_runtime)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def operations(api_schema: Any) -> list[Any]:
    return [result.ok() for result in api_schema.get_all_operations()]


def test_the_schema_has_the_api(operations: list[Any]) -> None:
    paths = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /api/v1/searches", "GET /api/v1/searches/{search_id}/best/onnx", "GET /healthz"} <= paths


def test_no_server_errors(operations: list[Any], fuzz_headers: dict[str, str]) -> None:
    """Every operation, with generated (valid and invalid) inputs, authenticated and not."""
    failures: list[str] = []
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: Any) -> None:
            for headers in (fuzz_headers, {}):
                response = case.call(headers=headers)
                statuses.append(response.status_code)
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} {case.query} {case.body!r}: "
                        f"{response.status_code} {response.text[:300]}"
                    )

        run()
    assert not failures, "\n".join(failures[:10])
    # it did exercise the API: accepted requests, refused ones, and unauthenticated ones
    assert len(statuses) >= 10 * len(operations)
    assert {200, 201, 401, 404, 422} <= set(statuses), sorted(set(statuses))
