"""A detection search over the REST API (`spsa-nas serve` as a real process, trials on Ray): the
built-in detection_quick space on the generated shapes data; best returns the detector's spec and
COCO metrics, and the downloaded weights and ONNX rebuild a detector that predicts."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load

from service.api.schemas import SearchCreate
from service.searches.submit import SubmitError, check_quotas
from spsa_nas import ArchSpec, build_model
from tests.service.conftest import Service, make_settings
from tests.service.helpers import Server, add_user, wait_for

DETECTION = {
    "space": "detection_quick",
    "dataset": {"name": "shapes", "shapes_images": 16, "shapes_size": 96},
    "trials": 1,
    "train": {"epochs": 1, "batch_size": 4, "lr": 0.01, "max_steps_per_epoch": 2},
    "latency": {"repeats": 3, "warmup": 1, "blocks": 4, "max_time_s": 1.0, "max_warmup_s": 0.5},
}


@pytest.mark.slow
@pytest.mark.ray
def test_a_detection_search_completes_and_its_best_detector_rebuilds_and_predicts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    token = add_user(data_dir, "alice")
    server = Server(data_dir).start()
    try:
        client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        refused = client.post("/api/v1/searches", json={**DETECTION, "dataset": {"name": "digits"}})
        assert refused.status_code == 422, refused.text
        problem = refused.json()["detail"][0]
        assert problem["loc"] == ["body", "dataset", "name"] and "needs detection data" in problem["msg"]

        created = client.post("/api/v1/searches", json=DETECTION)
        assert created.status_code == 201, created.text
        url = created.json()["links"]["self"]
        finished = lambda b: b["status"] not in ("queued", "running")  # noqa: E731
        done = wait_for(client, url, finished, 900, "the search", server)
        assert done["status"] == "completed", (done, server.log())

        best = client.get(f"{url}/best").json()
        spec = ArchSpec.model_validate(best["spec"])
        assert spec.task == "detection" and spec.detector is not None and spec.detector.name == "fasterrcnn"
        metrics = best["metrics"]
        for key in ("val_acc", "ap", "ap50", "ap75", "aps", "apm", "apl", "params", "flops", "latency_ms"):
            assert key in metrics, key
        assert metrics["task"] == "detection" and 0.0 <= metrics["val_acc"] <= 1.0 and metrics["params"] > 0

        weights = client.get(f"{url}/best/weights")
        assert weights.status_code == 200
        model = build_model(spec, weights=load(weights.content)).eval()
        assert not model.load_report.initialised and not model.load_report.mismatched
        image = torch.rand(1, 3, spec.input_size, spec.input_size)
        with torch.no_grad():
            prediction = model(image)[0]
        assert set(prediction) == {"boxes", "labels", "scores"}
        assert torch.isfinite(prediction["boxes"]).all()

        exported = client.get(f"{url}/best/onnx")
        assert exported.status_code == 200, exported.text
        session = ort.InferenceSession(exported.content)
        boxes, labels, scores = session.run(None, {"images": image.numpy()})
        assert labels.tolist() == prediction["labels"].tolist()
        np.testing.assert_allclose(boxes, prediction["boxes"].numpy(), atol=1e-3)
        np.testing.assert_allclose(scores, prediction["scores"].numpy(), atol=1e-4)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("dataset", "loc", "words"),
    [
        ({"name": "coco"}, "path", "coco needs a path"),
        ({"name": "coco", "path": "../outside"}, "path", "data root"),
        ({"name": "digits"}, "name", "needs detection data"),
    ],
)
def test_detection_data_must_be_under_the_data_root_and_fit_the_space(
    service: Service, dataset: dict[str, object], loc: str, words: str
) -> None:
    response = service.client.post("/api/v1/searches", headers=service.user(),
                                   json={"space": "detection_quick", "dataset": dataset})
    assert response.status_code == 422, response.text
    problems = {tuple(p["loc"]): p["msg"] for p in response.json()["detail"]}
    assert words in problems[("body", "dataset", loc)], problems


@pytest.mark.parametrize(("field", "value", "variable"), [
    ("shapes_images", 65, "SPSA_NAS_MAX_SYNTHETIC_SAMPLES"),
    ("shapes_size", 129, "SPSA_NAS_MAX_IMAGE_SIZE"),
])
def test_the_shapes_size_is_held_to_the_servers_quotas(tmp_path: Path, field: str, value: int,
                                                       variable: str) -> None:
    settings = make_settings("sqlite", tmp_path, lambda: "", max_synthetic_samples=64, max_image_size=128)
    dataset = {"name": "shapes", "shapes_images": 16, "shapes_size": 64, field: value}
    body = SearchCreate.model_validate({"space": "detection_quick", "dataset": dataset})
    with pytest.raises(SubmitError) as refused:
        check_quotas(body, settings)
    problems = {p.loc: p.msg for p in refused.value.problems}
    assert variable in problems[("dataset", field)], problems
    check_quotas(SearchCreate.model_validate({"space": "detection_quick", "dataset": {"name": "shapes"}}),
                 make_settings("sqlite", tmp_path, lambda: ""))  # the defaults pass
