"""optuna-dashboard behind the login: cookie auth, per-user studies, refused study changes."""

from __future__ import annotations

import pytest

from tests.service.conftest import Service

pytestmark = pytest.mark.postgres


def _login(service: Service, headers: dict[str, str]) -> dict[str, str]:
    """Log in with the form; the headers a browser then sends (session cookie, same origin)."""
    token = headers["Authorization"].split()[1]
    response = service.client.post(
        "/login",
        data={"token": token, "next": "/dashboard"},
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )
    assert response.status_code == 303 and response.headers["location"] == "/dashboard"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower()
    return {"Cookie": cookie.split(";")[0], "Origin": "http://testserver"}


def test_login_cookie_and_per_user_studies(service: Service) -> None:
    alice, bob, admin = service.user(), service.user(), service.user(admin=True)
    search = service.submit(alice)
    service.fill(search, [(0.5, 2.0)])
    study_id = int(search["links"]["dashboard"].rsplit("/", 1)[1])
    a, b, root = _login(service, alice), _login(service, bob), _login(service, admin)
    service.client.cookies.clear()

    names = [s["study_name"] for s in service.client.get("/api/studies", headers=a).json()["study_summaries"]]
    assert search["study_name"] in names
    assert search["study_name"] not in [
        s["study_name"] for s in service.client.get("/api/studies", headers=b).json()["study_summaries"]
    ]
    assert search["study_name"] in [
        s["study_name"] for s in service.client.get("/api/studies", headers=root).json()["study_summaries"]
    ]

    assert service.client.get(f"/api/studies/{study_id}", headers=a).status_code == 200
    for path in (
        f"/api/studies/{study_id}",
        f"/api/studies/{study_id}/param_importances",
        f"/csv/{study_id}",
    ):
        response = service.client.get(path, headers=b)
        assert response.status_code in (404, 400), (path, response.status_code)
        assert search["study_name"] not in response.text
    trial_id = service.study(search).trials[0]._trial_id
    note = service.client.put(
        f"/api/studies/{study_id}/{trial_id}/note", headers=b, json={"version": 0, "body": "mine now"}
    )
    assert note.status_code >= 400 and note.status_code != 500


def test_study_changes_are_refused(service: Service) -> None:
    alice = service.user()
    search = service.submit(alice)
    study_id = int(search["links"]["dashboard"].rsplit("/", 1)[1])
    a = _login(service, alice)
    service.client.cookies.clear()
    for method, path in (
        ("delete", f"/api/studies/{study_id}"),
        ("post", "/api/studies"),
        ("post", f"/api/studies/{study_id}/rename"),
        ("post", "/api/trials/1/tell"),
    ):
        response = getattr(service.client, method)(path, headers=a)
        assert response.status_code == 403, (method, path)
        assert "not allowed" in response.json()["reason"]
    assert service.study(search)  # still there


def test_anonymous_browsers_go_to_the_login_form(service: Service) -> None:
    service.client.cookies.clear()
    response = service.client.get("/dashboard/studies/1", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].startswith("/login?next=")
    assert service.client.get("/api/studies").status_code == 401
    form = service.client.get("/login")
    assert 'name="token"' in form.text
    bad = service.client.post(
        "/login",
        content=b"token=spsa_nope&next=/dashboard",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert bad.status_code == 401
    evil = service.client.post(
        "/login",
        content=b"token=spsa_nope&next=//evil.example",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert "evil" not in evil.headers.get("location", "") and "evil" not in evil.text


def test_login_form_sets_the_cookie(service: Service) -> None:
    token = service.user()["Authorization"].split()[1]
    response = service.client.post(
        "/login",
        content=f"token={token}&next=/dashboard/studies/1".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert response.status_code == 303 and response.headers["location"] == "/dashboard/studies/1"
    assert "spsa_nas_session=" in response.headers["set-cookie"]
    assert token not in response.headers["set-cookie"]
    service.client.cookies.clear()
