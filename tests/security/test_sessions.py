"""Dashboard sessions over real HTTP: an opaque server-side cookie, logout and revocation end it, no
token in a URL, cross-site logins refused; Secure cookies and expiry in-process."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service import crud
from service.app import create_app
from service.core.settings import Settings
from tests.security.live import SESSION_COOKIE, Live
from tests.security.rawhttp import send
from tests.service.helpers import cli

pytestmark = pytest.mark.slow


def _studies_status(live: Live, cookie: str) -> int:
    return send(live.url, "GET", "/api/studies", [("Cookie", cookie)]).status


def test_the_cookie_is_an_opaque_session_not_the_token(live: Live) -> None:
    cookie = live.login(live.alice)
    name, _, value = cookie.partition("=")
    assert name == SESSION_COOKIE
    assert live.alice.token not in cookie and value not in live.alice.token
    # the session id is no API token
    answer = send(live.url, "GET", "/api/v1/searches", [("Authorization", f"Bearer {value}")])
    assert answer.status == 401
    with live.client() as client:
        response = client.post(
            "/login", data={"token": live.alice.token, "next": "/dashboard"}, headers={"Origin": live.url}
        )
    set_cookie = response.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=lax" in set_cookie and "path=/" in set_cookie
    assert "max-age=" in set_cookie
    assert _studies_status(live, cookie) == 200


def test_logout_ends_the_session(live: Live) -> None:
    cookie = live.login(live.alice)
    assert _studies_status(live, cookie) == 200
    page = send(live.url, "GET", "/logout", [("Cookie", cookie)])
    assert page.status == 200 and 'method="post"' in page.text  # a GET only shows the button
    assert _studies_status(live, cookie) == 200
    cross = send(live.url, "POST", "/logout", [("Cookie", cookie), ("Origin", "https://evil.example")])
    assert cross.status == 403 and _studies_status(live, cookie) == 200
    answer = send(live.url, "POST", "/logout", [("Cookie", cookie), ("Origin", live.url)])
    assert answer.status == 303 and answer.headers["location"] == "/login"
    assert _studies_status(live, cookie) == 401  # the old cookie is dead on the server, not just forgotten


def test_revoking_a_user_ends_their_sessions(live: Live) -> None:
    carol = live.add_account("carol")
    cookie = live.login(carol)
    assert _studies_status(live, cookie) == 200
    revoked = cli("users", "revoke", "carol", "--data-dir", str(live.data_dir))
    assert revoked.returncode == 0, revoked.stderr
    assert _studies_status(live, cookie) == 401
    # a new token re-activates carol, but not the session opened with the revoked one
    assert cli("users", "token", "carol", "--data-dir", str(live.data_dir)).returncode == 0
    assert _studies_status(live, cookie) == 401


def test_a_token_in_a_url_is_refused(live: Live) -> None:
    answer = send(live.url, "GET", f"/login?token={live.alice.token}&next=/dashboard")
    assert answer.status == 400
    assert "set-cookie" not in {k.lower() for k in answer.headers}
    assert 'method="post"' in answer.text  # the form, with a word on why
    assert live.alice.token not in answer.text


def test_cross_site_logins_are_refused(live: Live) -> None:
    body = f"token={live.alice.token}&next=/dashboard".encode()
    form = ("Content-Type", "application/x-www-form-urlencoded")
    for headers in (
        [("Origin", "https://evil.example")],
        [("Sec-Fetch-Site", "cross-site")],
        [("Origin", "null")],
    ):
        answer = send(live.url, "POST", "/login", [form, *headers], body)
        assert answer.status == 403, headers
        assert "set-cookie" not in {k.lower() for k in answer.headers}
    # a script without a browser's headers still logs in (curl, the CLI)
    assert send(live.url, "POST", "/login", [form], body).status == 303


def _app(tmp_path: Path, **settings: object) -> TestClient:
    app = create_app(Settings(data_dir=tmp_path, concurrent_searches=0, **settings))  # type: ignore[arg-type]
    return TestClient(app, base_url="https://spsa.example")


def test_secure_cookies_behind_tls_and_expiry(tmp_path: Path) -> None:
    from service.core.models import WebSession, utcnow

    with _app(tmp_path, cookie_secure=True, session_ttl_s=600) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        with runtime.sessions() as session:
            _, token = crud.create_user(session, name="dave")
            session.commit()
        response = client.post(
            "/login",
            data={"token": token, "next": "/dashboard"},
            headers={"Origin": "https://spsa.example"},
            follow_redirects=False,
        )
        assert response.status_code == 303
        set_cookie = response.headers["set-cookie"].lower()
        assert "secure" in set_cookie and "max-age=600" in set_cookie
        cookie = {"Cookie": f"{SESSION_COOKIE}={response.cookies[SESSION_COOKIE]}"}
        client.cookies.clear()
        assert client.get("/api/studies", headers=cookie).status_code == 200
        with runtime.sessions() as session:  # the session's time is up
            session.execute(update(WebSession).values(expires_at=utcnow() - timedelta(seconds=1)))
            session.commit()
        assert client.get("/api/studies", headers=cookie).status_code == 401
