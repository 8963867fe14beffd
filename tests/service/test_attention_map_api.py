"""GET/POST /api/v1/searches/{id}/best/attention-map: PNG answers drawn in a child process (real model
weights, the search's dataset), 4xx for what a client can get wrong, and the concurrency cap."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.routes import maps
from service.app import create_app
from service.runtime import build_runtime
from tests.service.conftest import Service, make_settings


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def maps_service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """An app whose figures may take as long as a loaded machine needs (the first one in a fresh
    environment also builds SPSA's C++ kernel): the tests check answers, not speed."""
    settings = make_settings(request.param, tmp_path_factory.mktemp(f"maps-{request.param}"),
                             lambda: request.getfixturevalue("postgres_url"), attention_map_timeout_s=1800)
    runtime = build_runtime(settings)
    with TestClient(create_app(settings, runtime=runtime), raise_server_exceptions=False) as client:
        yield Service(request.param, settings, runtime, client)
    runtime.close()


def _image(fmt: str = "PNG", size: tuple[int, int] = (28, 28)) -> bytes:
    out = io.BytesIO()
    Image.new("L", size, 128).save(out, format=fmt)
    return out.getvalue()


def _problem(response: Any) -> tuple[list[str], str]:
    """(loc, msg) of a 422 that names one field, as FastAPI's own 422s do."""
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    return problem["loc"], problem["msg"]


def _is_png(body: bytes) -> bool:
    return Image.open(io.BytesIO(body)).format == "PNG"


def test_the_best_models_maps_on_a_dataset_sample_and_on_an_uploaded_image(maps_service: Service) -> None:
    service = maps_service
    alice, bob = service.user(), service.user()
    search = service.submit(alice)
    service.fill(search, [(0.5, 1.0)])  # real weights of a model with SPSA in its first stage
    url = f"/api/v1/searches/{search['id']}/best/attention-map"

    sample = service.client.get(url, params={"sample": 2}, headers=alice)
    assert sample.status_code == 200, sample.text
    assert sample.headers["content-type"] == "image/png" and _is_png(sample.content)

    posted = service.client.post(url, content=_image("JPEG"), headers={**alice, "Content-Type": "image/jpeg"})
    assert posted.status_code == 200, posted.text
    assert _is_png(posted.content)

    assert service.client.get(url, headers=bob).status_code == 404  # not bob's search

    bad = service.client.post(url, content=b"\x89PNG broken", headers={**alice, "Content-Type": "image/png"})
    assert bad.status_code == 422
    loc, msg = _problem(bad)
    assert loc == ["body"] and "cannot be read as PNG or JPEG" in msg

    module = service.client.get(url, params={"modules": "layer4.0"}, headers=alice)
    loc, msg = _problem(module)
    assert loc == ["query", "modules"]
    assert "no SPSA module in 'layer4.0'; the model has SPSA in: layer1.0" in msg

    outside = service.client.get(url, params={"sample": 999_999}, headers=alice)
    loc, msg = _problem(outside)
    assert loc == ["query", "sample"] and "validation split of digits has" in msg


def test_requests_refused_before_anything_is_drawn(maps_service: Service) -> None:
    service = maps_service
    alice = service.user()
    empty = service.submit(alice)
    no_trial = service.client.get(f"/api/v1/searches/{empty['id']}/best/attention-map", headers=alice)
    assert no_trial.status_code == 404  # no complete trial: nothing to draw
    search = service.submit(alice)
    service.fill(search, [(0.5, 1.0)])
    url = f"/api/v1/searches/{search['id']}/best/attention-map"

    gif = {**alice, "Content-Type": "image/gif"}
    wrong_type = service.client.post(url, content=_image("GIF"), headers=gif)
    assert wrong_type.status_code == 415 and "image/png or image/jpeg" in wrong_type.json()["detail"]
    empty = service.client.post(url, content=b"", headers={**alice, "Content-Type": "image/png"})
    assert _problem(empty) == (["body"], "the body is empty: send a PNG or JPEG")
    negative = service.client.get(url, params={"sample": -1}, headers=alice)
    assert negative.status_code == 422
    many = service.client.get(url, params={"modules": ",".join(f"m{i}" for i in range(65))}, headers=alice)
    assert _problem(many) == (["query", "modules"], "at most 64 names, got 65")
    huge = service.client.post(url, content=b"\0" * (service.settings.max_body_bytes + 1),
                               headers={**alice, "Content-Type": "image/png"})
    assert huge.status_code == 413

    # Every slot taken (here by the test): the next request is told to come back, not queued.
    slot = maps._slot(service.runtime)
    held = [slot.acquire(blocking=False) for _ in range(service.settings.max_concurrent_attention_maps)]
    try:
        assert all(held)
        busy = service.client.get(url, headers=alice)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "5"
        assert "SPSA_NAS_MAX_CONCURRENT_ATTENTION_MAPS" in busy.json()["detail"]
    finally:
        for _ in held:
            slot.release()
