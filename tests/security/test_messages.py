"""What the API tells a user carries no server paths and names nothing of other users' data."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from sqlalchemy import update

from search_spaces.run import RunReport
from service.core.models import Search
from service.core.redact import redact_json, redact_paths
from service.core.settings import Settings
from tests.service.conftest import Service, tiny_spec

pytestmark = pytest.mark.postgres


def _server_paths(service: Service) -> list[str]:
    """The server's own directories, as configured and resolved."""
    s = service.settings
    dirs = (s.data_dir, s.data_root_path, s.artifact_path)
    return sorted({str(d) for d in dirs} | {os.path.realpath(d) for d in dirs})


def test_an_unknown_dataset_folder_names_nothing_in_the_data_root(service: Service) -> None:
    root = service.settings.data_root_path
    (root / "other-users-secret-set" / "train").mkdir(parents=True, exist_ok=True)
    response = service.client.post(
        "/api/v1/searches",
        headers=service.user(),
        json={"dataset": {"name": "imagefolder", "path": "nope"}},
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "dataset", "path"]
    assert "other-users-secret-set" not in response.text
    assert "images" not in response.text  # the fixture's own dataset folder
    for path in _server_paths(service):
        assert path not in response.text
    assert "'nope' is not a directory under the server's data root" in error["msg"]
    assert "operator" in error["msg"]  # says who puts datasets there


@pytest.mark.parametrize("path", ["../", "images/../../x", "/etc", "nope/deeper", ""])
def test_refused_dataset_paths_answer_without_server_paths(service: Service, path: str) -> None:
    response = service.client.post(
        "/api/v1/searches", headers=service.user(), json={"dataset": {"name": "imagefolder", "path": path}}
    )
    assert response.status_code == 422, response.text
    for server_path in _server_paths(service):
        assert server_path not in response.text


def test_no_answer_about_a_search_carries_the_data_root(service: Service) -> None:
    """The server sets the dataset's data root; it stays in the study, out of every answer."""
    alice = service.user()
    created = service.client.post("/api/v1/searches", headers=alice, json={"dataset": {"name": "digits"}})
    assert created.status_code == 201, created.text
    base = created.json()["links"]["self"]
    answers = [
        created,
        service.client.get(base, headers=alice),
        service.client.get("/api/v1/searches", headers=alice),
        service.client.post(f"{base}/cancel", headers=alice),
    ]
    for response in answers:
        assert response.status_code in (200, 201), response.text
        assert "data_root" not in response.text
        for path in _server_paths(service):
            assert path not in response.text


def _failed_trial_error(service: Service) -> str:
    s = service.settings
    return (
        f"FileNotFoundError: [Errno 2] No such file or directory: '{s.data_root_path}/sets/train' "
        f"(weights were going to {s.artifact_path}/ab/cd)"
    )


REDACTED_ERROR = (
    "FileNotFoundError: [Errno 2] No such file or directory: '<data_root>/sets/train' "
    "(weights were going to <artifact_dir>/ab/cd)"
)


def test_trial_errors_answer_without_server_paths(service: Service) -> None:
    alice = service.user()
    search = service.submit(alice)
    study = service.study(search)
    failed = study.ask()
    failed.suggest_categorical("width", [0.25, 0.5])
    failed.set_user_attr("error", _failed_trial_error(service))
    failed.set_user_attr("reason", f"no images in {service.settings.data_root_path}/sets")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    complete = study.ask()
    complete.suggest_categorical("width", [0.25, 0.5])
    for key, value in {
        "spec": tiny_spec(),
        "val_acc": 0.5,
        "latency_ms": 1.0,
        "feasible": True,
        "reason": f"latency measured with {sys.prefix}/bin/python",
    }.items():
        complete.set_user_attr(key, value)
    study.tell(complete, [0.5, 1.0])

    trials = service.client.get(f"/api/v1/searches/{search['id']}/trials", headers=alice)
    assert trials.status_code == 200, trials.text
    metrics = [t["metrics"] for t in trials.json()["data"]]
    assert metrics[0]["error"] == REDACTED_ERROR
    assert metrics[0]["reason"] == "no images in <data_root>/sets"
    assert metrics[1]["reason"] == "latency measured with <server>/bin/python"
    best = service.client.get(f"/api/v1/searches/{search['id']}/best", headers=alice)
    assert best.status_code == 200, best.text
    assert best.json()["metrics"]["reason"] == "latency measured with <server>/bin/python"
    pareto = service.client.get(f"/api/v1/searches/{search['id']}/pareto", headers=alice)
    assert pareto.status_code == 200 and pareto.json()["count"] == 1
    for response in (trials, best, pareto):
        for path in [*_server_paths(service), sys.prefix]:
            assert path not in response.text


def test_a_failed_search_answers_without_server_paths(service: Service) -> None:
    alice = service.user()
    search = service.submit(alice)
    error = _failed_trial_error(service)
    with service.runtime.sessions() as session:  # what the dispatcher stores when trials keep failing
        session.execute(
            update(Search)
            .where(Search.id == search["id"])
            .values(
                status="failed",
                error=f"RuntimeError: trials kept failing; last error: {error}",
                result=RunReport(
                    outcome="failing",
                    runner="local",
                    study_name=search["study_name"],
                    trials_requested=3,
                    finished=0,
                    counts={"fail": 3},
                    ran=3,
                    crashed=3,
                    last_error=error,
                    elapsed_s=1.0,
                ).to_json(),
            )
        )
        session.commit()
    response = service.client.get(f"/api/v1/searches/{search['id']}", headers=alice)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["error"] == f"RuntimeError: trials kept failing; last error: {REDACTED_ERROR}"
    assert body["summary"]["last_error"] == REDACTED_ERROR
    for path in _server_paths(service):
        assert path not in response.text


def test_redact_paths_replaces_the_longest_directory_first(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", artifact_dir=tmp_path / "data" / "datasets" / "art")
    data_dir = settings.data_dir
    text = (
        f"read {data_dir}/datasets/cifar, wrote {data_dir}/datasets/art/x.safetensors, "
        f"db {data_dir}/spsa-nas.db"
    )
    assert redact_paths(text, settings) == (
        "read <data_root>/cifar, wrote <artifact_dir>/x.safetensors, db <data_dir>/spsa-nas.db"
    )


def test_redact_paths_knows_the_resolved_and_the_given_forms(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "sets").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    # as configured (model_construct keeps the symlink; Settings() would resolve it)
    settings = Settings.model_construct(data_dir=tmp_path / "d", data_root=link / "sets", artifact_dir=None)
    text = f"no train/ in {link}/sets/a nor in {real}/sets/b"
    assert redact_paths(text, settings) == "no train/ in <data_root>/a nor in <data_root>/b"


def test_redact_paths_hides_home_python_and_temporary_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_tmp = tmp_path / "real-tmp"
    real_tmp.mkdir()
    (tmp_path / "tmp-link").symlink_to(real_tmp)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp-link"))
    settings = Settings(data_dir=tmp_path / "d")
    home = Path.home()
    text = f"{home}/.cache/x; {sys.prefix}/lib/site.py; {tmp_path}/tmp-link/ray/session; {real_tmp}/w"
    assert redact_paths(text, settings) == (
        "<server>/.cache/x; <server>/lib/site.py; <server>/ray/session; <server>/w"
    )


def test_redact_paths_leaves_other_text_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent-tmp")  # tmp_path is not a server dir here
    settings = Settings(data_dir=tmp_path / "d")
    data_dir = str(settings.data_dir)
    for text in (
        "ValueError: width must be positive",
        "no such dataset 'cifar10' under the data root",
        "paths like /etc/passwd, ./data and ../x are not ours",
        f"{data_dir}x/y and /prefix{data_dir}/z, /nonexistent-tmpfiles",  # not whole path components
        "",
    ):
        assert redact_paths(text, settings) == text
    assert redact_paths(f"at {data_dir}.", settings) == "at <data_dir>."


def test_redact_json_redacts_every_string(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d")
    root = str(settings.data_root_path)
    value = {"dataset": {"data_root": root, "path": "a"}, "errors": [f"{root}/a", 3, None], "n": 1.5}
    assert redact_json(value, settings) == {
        "dataset": {"data_root": "<data_root>", "path": "a"},
        "errors": ["<data_root>/a", 3, None],
        "n": 1.5,
    }
