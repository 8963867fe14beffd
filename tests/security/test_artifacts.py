"""Attacks through artifacts over real HTTP: artifact ids that point outside the artifact root, HTML
uploaded through the dashboard, deleting another user's files."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest

from tests.security.live import Live, complete_trial
from tests.security.rawhttp import send

pytestmark = pytest.mark.slow

SECRET = b"the server's private key: do not serve me"


def _secret_file(live: Live) -> Path:
    path = live.data_dir.parent / "secret.txt"
    path.write_bytes(SECRET)
    return path


@pytest.mark.parametrize("download", ["weights", "onnx"])
def test_artifact_attrs_cannot_point_outside_the_artifact_root(live: Live, download: str) -> None:
    secret = _secret_file(live)
    artifacts = live.data_dir / "artifacts"
    for pointer in (
        str(secret),  # absolute
        f"../../{secret.name}",  # relative, climbing out
        f"../{secret.parent.name}/../{secret.name}",
        str(artifacts / ".." / ".." / secret.name),
        "%2e%2e/%2e%2e/secret.txt",
        str(uuid.uuid4()) + "/../../secret.txt",
        "",
        ".",
    ):
        trial = complete_trial(live, live.alice, attrs={f"{download}_artifact": pointer})
        answer = send(
            live.url,
            "GET",
            f"/api/v1/searches/{live.alice.search['id']}/best/{download}?trial={trial.number}",
            [("Authorization", f"Bearer {live.alice.token}")],
        )
        assert answer.status == 404, (pointer, answer.status)
        assert SECRET not in answer.body, pointer
        assert str(live.data_dir) not in answer.text, pointer


def _upload(live: Live, cookie: str, path: str, filename: str, mime: str, data: bytes) -> tuple[int, dict]:
    uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    answer = send(
        live.url,
        "POST",
        path,
        [("Cookie", cookie), ("Origin", live.url)],
        {"file": uri, "filename": filename},
    )
    return answer.status, (answer.json() if answer.body.startswith(b"{") else {})


PAGES = [
    ("evil.html", "text/html", b"<html><script>fetch('/api/v1/searches')</script></html>"),
    ("evil.svg", "image/svg+xml", b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"),
    ("evil.xhtml", "application/xhtml+xml", b"<html xmlns='http://www.w3.org/1999/xhtml'></html>"),
    ("evil.txt", "text/plain", b"<html><script>alert(1)</script></html>"),  # sniffable
]


@pytest.mark.parametrize(("filename", "mime", "data"), PAGES)
def test_uploaded_pages_are_never_served_inline(live: Live, filename: str, mime: str, data: bytes) -> None:
    cookie = live.login(live.alice)
    trial_id = live.study(live.alice).trials[0]._trial_id  # running: the dashboard accepts files for it
    for path in (f"/api/artifacts/{live.alice.study_id}/{trial_id}", f"/api/artifacts/{live.alice.study_id}"):
        status, body = _upload(live, cookie, path, filename, mime, data)
        assert status == 201, (path, status, body)
        artifact_id = body["artifact_id"]
        where = path.replace("/api/artifacts/", "/artifacts/") + f"/{artifact_id}"
        answer = send(live.url, "GET", where, [("Cookie", cookie)])
        assert answer.status == 200 and answer.body == data
        headers = {k.lower(): v for k, v in answer.headers.items()}
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["content-disposition"].startswith("attachment")
        assert "sandbox" in headers["content-security-policy"]
        active = ("text/html", "image/svg", "application/xhtml", "text/xml")
        assert not headers["content-type"].startswith(active)
        assert "access-control-allow-origin" not in headers


def test_another_users_artifacts_cannot_be_deleted(live: Live) -> None:
    trial = complete_trial(live, live.alice, weights=b"alice's weights")
    artifact_id = trial.user_attrs["weights_artifact"]
    stored = live.data_dir / "artifacts" / artifact_id
    assert stored.is_file()
    bob_cookie = live.login(live.bob)
    bob_trial = live.study(live.bob).trials[0]._trial_id
    for path in (
        f"/api/artifacts/{live.bob.study_id}/{bob_trial}/{artifact_id}",  # bob's trial, alice's file
        f"/api/artifacts/{live.bob.study_id}/{artifact_id}",
        f"/api/artifacts/{live.alice.study_id}/{trial._trial_id}/{artifact_id}",  # alice's study
        f"/api/artifacts/{live.alice.study_id}/{artifact_id}",
    ):
        answer = send(live.url, "DELETE", path, [("Cookie", bob_cookie), ("Origin", live.url)])
        assert answer.status in (403, 404), (path, answer.status)
        assert stored.is_file(), path
    # a finished trial's files are the search's results: not even their owner deletes them here
    alice_cookie = live.login(live.alice)
    path = f"/api/artifacts/{live.alice.study_id}/{trial._trial_id}/{artifact_id}"
    answer = send(live.url, "DELETE", path, [("Cookie", alice_cookie), ("Origin", live.url)])
    assert answer.status == 403 and stored.is_file()
    # a file alice attached to her running trial: bob and the admin may not delete it, she may
    running = live.study(live.alice).trials[0]._trial_id
    status, body = _upload(
        live, alice_cookie, f"/api/artifacts/{live.alice.study_id}/{running}", "n.txt", "text/plain", b"x"
    )
    assert status == 201, body
    attached = live.data_dir / "artifacts" / body["artifact_id"]
    path = f"/api/artifacts/{live.alice.study_id}/{running}/{body['artifact_id']}"
    for cookie in (bob_cookie, live.login(live.root)):
        answer = send(live.url, "DELETE", path, [("Cookie", cookie), ("Origin", live.url)])
        assert answer.status in (403, 404) and attached.is_file()
    answer = send(live.url, "DELETE", path, [("Cookie", alice_cookie), ("Origin", live.url)])
    assert answer.status == 204, answer.text
    assert not attached.exists()


def test_uploads_to_other_users_studies_are_refused(live: Live) -> None:
    cookie = live.login(live.bob)
    alice_trial = live.study(live.alice).trials[0]._trial_id
    before = json.dumps(live.system_attrs(live.alice), sort_keys=True)
    study = live.alice.study_id
    for path in (f"/api/artifacts/{study}/{alice_trial}", f"/api/artifacts/{study}"):
        status, _ = _upload(live, cookie, path, "x.txt", "text/plain", b"bob was here")
        assert status in (403, 404), (path, status)
    assert json.dumps(live.system_attrs(live.alice), sort_keys=True) == before
