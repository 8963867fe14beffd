"""The oneshot strategy through the REST API: the body's fields and their errors, the phase and the
supernet's curve in the progress, estimates labelled in the metrics, and a real search end to end."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load

from search_spaces.keys import ESTIMATE_ATTR, ONNX_SKIPPED_ATTR, PHASE_ATTR, RETRAIN_OF_ATTR, SUPERNET_ATTR
from spsa_nas import ArchSpec, build_model
from tests.service.conftest import Service, tiny_spec
from tests.service.helpers import Server, add_user, wait_for
from workers.oneshot import CANDIDATE_NO_ONNX


def test_oneshot_fields_are_accepted_and_echoed(service: Service) -> None:
    alice = service.user()
    search = service.submit(alice, strategy="oneshot", retrain_top_k=2,
                            oneshot={"epochs": 2, "bn_batches": 4})
    config = service.client.get(search["links"]["self"], headers=alice).json()["config"]
    assert config["strategy"] == "oneshot" and config["retrain_top_k"] == 2
    assert config["oneshot"] == {"epochs": 2, "bn_batches": 4, "workers": 1, "sampling": "uniform",
                                 "sandwich_paths": 2, "estimate": "loss"}
    by_accuracy = service.submit(alice, strategy="oneshot", oneshot={"estimate": "accuracy"})
    assert service.client.get(by_accuracy["links"]["self"], headers=alice).json()["config"]["oneshot"][
        "estimate"] == "accuracy"
    standalone = service.submit(alice)
    assert service.client.get(standalone["links"]["self"], headers=alice).json()["config"]["strategy"] == \
        "standalone"


@pytest.mark.parametrize(("body", "loc"), [
    ({"strategy": "supernet"}, ["body", "strategy"]),
    ({"retrain_top_k": -1}, ["body", "retrain_top_k"]),
    ({"oneshot": {"workers": "2"}}, ["body", "oneshot", "workers"]),
    ({"oneshot": {"epoch": 2}}, ["body", "oneshot", "epoch"]),
    ({"oneshot": {"estimate": "top5"}}, ["body", "oneshot", "estimate"]),
])
def test_bad_oneshot_fields_answer_422_naming_them(service: Service, body: dict, loc: list) -> None:
    alice = service.user()
    response = service.client.post("/api/v1/searches", headers=alice,
                                   json={"space": "quick", "dataset": {"name": "digits"}, **body})
    assert response.status_code == 422, response.text
    assert any(problem["loc"] == loc for problem in response.json()["detail"]), response.text


def test_a_space_that_refuses_oneshot_answers_422(service: Service) -> None:
    alice = service.user()
    space = {"name": "only-standalone", "backbone": "resnet18", "stem": "cifar", "input_size": 16,
             "width": 0.25, "all_stages": {"spsa": [False, True]}, "strategies": ["standalone"]}
    response = service.client.post("/api/v1/searches", headers=alice, json={
        "space": space, "dataset": {"name": "digits"}, "strategy": "oneshot"})
    assert response.status_code == 422, response.text
    assert "supports standalone, not 'oneshot'" in response.text


def test_progress_shows_the_phase_and_metrics_say_what_is_estimated(service: Service) -> None:
    alice = service.user()
    plain = service.submit(alice)
    before = service.client.get(plain["links"]["self"], headers=alice).json()["progress"]
    assert before["phase"] is None and before["supernet"] is None  # standalone: no phases
    # a oneshot study as its worker leaves it (written before the API's first read of it)
    search = service.submit(alice, strategy="oneshot")
    study = service.fill(search, [(0.8, 2.0), (0.6, 1.0)])
    study.set_user_attr(PHASE_ATTR, "candidates")
    study.set_user_attr(SUPERNET_ATTR, {"resnet18@w0.25": {
        "epoch": 2, "epochs": 2, "done": True, "checkpoint": "secret-artifact-id", "workers": 1,
        "curve": [{"epoch": 1, "train_loss": 2.1, "val_acc": 0.4, "seconds": 3.0}]}})
    first = study.get_trials(deepcopy=False)[0].user_attrs
    for attrs, values in (({ESTIMATE_ATTR: True, "val_loss": 1.25, "oneshot_score": 0.2865}, (0.9, 1.5)),
                          ({ESTIMATE_ATTR: False, RETRAIN_OF_ATTR: 2, "oneshot_val_acc": 0.9}, (0.7, 1.5))):
        trial = study.ask()  # a candidate and its retraining, as the oneshot worker tells them
        trial.suggest_categorical("width", [0.25, 0.5])
        for key, value in {**attrs, "spec": first["spec"], "val_acc": values[0], "latency_ms": values[1],
                           "weights_artifact": first["weights_artifact"]}.items():
            trial.set_user_attr(key, value)
        study.tell(trial, list(values))

    progress = service.client.get(search["links"]["self"], headers=alice).json()["progress"]
    assert progress["phase"] == "candidates"
    record = progress["supernet"]["resnet18@w0.25"]
    assert record["epoch"] == 2 and record["curve"][0]["val_acc"] == 0.4
    assert "checkpoint" not in record  # no artifact ids
    listed = service.client.get(search["links"]["trials"], headers=alice).json()["data"]
    by_number = {t["number"]: t["metrics"] for t in listed}
    assert "estimated" not in by_number[0]  # a trial without the attr (standalone): nothing is estimated
    # the estimates it has: a candidate has no test top1/top5 (it skips the test split)
    assert by_number[2]["estimated"] == ["val_acc", "val_loss", "oneshot_score"]
    assert by_number[3]["estimated"] == [] and by_number[3]["retrain_of"] == 2
    assert by_number[3]["oneshot_val_acc"] == 0.9
    assert by_number[2]["val_loss"] == 1.25 and by_number[2]["oneshot_score"] == 0.2865  # what ranks it
    best = service.client.get(f"{search['links']['self']}/best", headers=alice).json()
    assert best["trial"] == 3  # the retrained one, though candidate 2's estimate is higher
    assert best["metrics"]["estimated"] == [] and best["metrics"]["retrain_of"] == 2


ONESHOT = {
    "space": "quick",
    "dataset": {"name": "digits", "train_subset": 200},
    "train": {"epochs": 1, "batch_size": 16},
    "latency": {"repeats": 3, "warmup": 1},
    "strategy": "oneshot",
    "retrain_top_k": 1,
    "oneshot": {"epochs": 1, "bn_batches": 2},
    "trials": 4,
    "parallelism": 2,  # the two widths' supernets train at once (one Ray task each)
}


@pytest.mark.slow
@pytest.mark.ray
def test_oneshot_search_end_to_end_over_http(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    token = add_user(data_dir, "alice")
    server = Server(data_dir).start()
    try:
        client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        created = client.post("/api/v1/searches", json=ONESHOT)
        assert created.status_code == 201, created.text
        url = created.json()["links"]["self"]
        done = wait_for(client, url, lambda b: b["status"] not in ("queued", "running"), 900, "the search",
                        server)
        assert done["status"] == "completed", (done, server.log())
        progress = done["progress"]
        assert progress["phase"] == "done" and progress["finished"] == 5  # 4 candidates + 1 retrained
        assert set(progress["supernet"]) == {"resnet18@w0.25", "resnet18@w0.5"}  # one per width
        assert all(r["done"] and len(r["curve"]) == 1 for r in progress["supernet"].values())
        trials = client.get(f"{url}/trials").json()["data"]
        estimates = [t for t in trials if t["metrics"].get("estimated")]
        assert len(estimates) == 4 and all(t["metrics"]["epochs"] == 0 for t in estimates)
        best = client.get(f"{url}/best").json()
        assert best["metrics"]["estimated"] == [] and best["metrics"]["retrain_of"] in {
            t["number"] for t in estimates}
        weights = client.get(f"{url}/best/weights")
        assert weights.status_code == 200
        assert client.get(f"{url}/best/onnx").status_code == 200  # the retrained best was exported
        spec = ArchSpec.model_validate(best["spec"])
        model = build_model(spec, weights=load(weights.content)).eval()
        assert not model.load_report.initialised and not model.load_report.mismatched
        with torch.no_grad():
            out = model(torch.randn(2, spec.in_channels, spec.input_size, spec.input_size))
        assert out.shape == (2, spec.num_classes) and torch.isfinite(out).all()
    finally:
        server.stop()


def test_a_candidate_best_without_onnx_says_why(service: Service) -> None:
    alice = service.user()
    search = service.submit(alice, strategy="oneshot", retrain_top_k=0)
    study = service.study(search)
    trial = study.ask()
    trial.suggest_categorical("width", [0.25, 0.5])
    for key, value in {"spec": tiny_spec(), "val_acc": 0.9, "latency_ms": 2.0, "feasible": True,
                       ESTIMATE_ATTR: True, ONNX_SKIPPED_ATTR: CANDIDATE_NO_ONNX}.items():
        trial.set_user_attr(key, value)
    study.tell(trial, [0.9, 2.0])
    response = service.client.get(f"{search['links']['self']}/best/onnx", headers=alice)
    assert response.status_code == 404, response.text
    assert "retrained (retrain_top_k)" in response.text and "spsa-nas export" in response.text
