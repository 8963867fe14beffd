"""Attacks on the dashboard gateway over real HTTP: forged identity headers, write routes past the
allow-list (slashes, encodings, `..`), the admin's read-only dashboard, cross-site writes."""

from __future__ import annotations

import json

import pytest

from tests.security.live import Account, Live
from tests.security.rawhttp import send

pytestmark = pytest.mark.slow


def _bearer(account: Account) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {account.token}")]


def _study_names(live: Live, headers: list[tuple[str, str]]) -> list[str]:
    answer = send(live.url, "GET", "/api/studies", headers)
    assert answer.status == 200, answer.text
    return [s["study_name"] for s in answer.json()["study_summaries"]]


FORGED = [
    "X-Spsa-Nas-Dashboard-User",  # the header the gateway used to set
    "X_Spsa_Nas_Dashboard_User",  # the same WSGI key, spelled with underscores
    "x_spsa_nas_dashboard_user",
]


def test_identity_never_comes_from_a_header(live: Live) -> None:
    # the admins' dashboard exists (root looked first), as on a server in use
    assert live.alice.search["study_name"] in _study_names(live, _bearer(live.root))
    bob = _bearer(live.bob)
    assert _study_names(live, bob) == [live.bob.search["study_name"]]
    for value in ("0:admin", "1:admin", "3:admin", "0", "1"):
        for name in FORGED:
            for repeats in (1, 2):
                headers = bob + [(name, value)] * repeats
                assert _study_names(live, headers) == [live.bob.search["study_name"]], (name, value, repeats)
                answer = send(live.url, "GET", f"/api/studies/{live.alice.study_id}", headers)
                assert answer.status in (403, 404), (name, value, answer.status)
                assert live.alice.search["study_name"] not in answer.text
        # both spellings at once (merged into one WSGI key)
        headers = [*bob, (FORGED[0], value), (FORGED[1], value)]
        assert _study_names(live, headers) == [live.bob.search["study_name"]], value


def _snapshot(live: Live, account: Account) -> str:
    """Everything a dashboard write could change in a study."""
    study = live.study(account)
    return json.dumps(
        {
            "name": study.study_name,
            "system": live.system_attrs(account),
            "user": study.user_attrs,
            "trials": [(t.state.name, t.values, t.user_attrs, t.system_attrs) for t in study.trials],
        },
        sort_keys=True,
        default=str,
    )


def _write_attempts(live: Live, target: Account) -> list[tuple[str, str, dict | None]]:
    study, trial = target.study_id, live.study(target).trials[0]._trial_id
    user_attrs = {"user_attrs": {"weights_artifact": "/etc/passwd"}}
    tell = {"state": "Complete", "values": [1.0, 0.0]}
    return [
        ("DELETE", f"/api/studies/{study}", None),
        ("DELETE", f"/api/studies/{study}/", None),
        ("DELETE", f"/api/studies/{study}//", None),
        ("DELETE", f"//api/studies/{study}", None),
        ("DELETE", f"/api/%73tudies/{study}", None),
        ("DELETE", f"/api/studies/{study}%2F", None),
        ("DELETE", f"/api/x/../studies/{study}", None),
        ("DELETE", f"/api/./studies/{study}", None),
        ("POST", f"/api/studies/{study}/rename//", {"study_name": "renamed"}),
        ("POST", "/api/studies//", {"study_name": "new", "directions": ["minimize"]}),
        ("POST", f"/api/trials/{trial}/tell//", tell),
        ("POST", f"/api/trials/{trial}/user-attrs//", user_attrs),
        ("POST", f"/api/trials/{trial}/user-attr%73", user_attrs),
        ("POST", f"/api/studies/{study}/preference", {"mode": "ChooseWorst", "candidates": [0]}),
        ("PUT", f"/api/studies/{study}/preference_feedback_component", {"output_type": "note"}),
        ("POST", "/incompatible-rdb-schema", {}),
        ("POST", "/api/llm/trial_filter_query", {"user_query": "x", "last_response": "", "last_error": ""}),
    ]


@pytest.mark.parametrize("caller", ["root", "alice"])
def test_write_routes_are_refused_in_every_spelling(live: Live, caller: str) -> None:
    """The admin's dashboard and a user's own are read-only but for notes and files: every other
    write answers 403 whatever the path's spelling, and changes nothing."""
    account = getattr(live, caller)
    target = live.alice  # alice's study: another user's for root, her own for alice
    before = _snapshot(live, target)
    for method, path, body in _write_attempts(live, target):
        answer = send(live.url, method, path, _bearer(account), body)
        assert answer.status == 403, (caller, method, path, answer.status, answer.text[:200])
    assert _snapshot(live, target) == before
    assert live.alice.search["study_name"] in _study_names(live, _bearer(live.root))


def test_the_admin_cannot_write_notes_on_other_users_studies(live: Live) -> None:
    before = _snapshot(live, live.bob)
    for path in (f"/api/studies/{live.bob.study_id}/note", f"/api/studies/{live.bob.study_id}/note/"):
        answer = send(live.url, "PUT", path, _bearer(live.root), {"version": 1, "body": "admin was here"})
        assert answer.status == 403, (path, answer.status)
    assert _snapshot(live, live.bob) == before


def test_other_users_studies_are_not_found_in_any_spelling(live: Live) -> None:
    alice_study = live.alice.study_id
    for path in (
        f"/api/studies/{alice_study}",
        f"/api/studies/{alice_study}/",
        f"//api/studies/{alice_study}",
        f"/api/studies/{alice_study}/param_importances",
        f"/api/%73tudies/{alice_study}",
        f"/api/studies/{live.bob.study_id}/../{alice_study}",
        f"/csv/{alice_study}",
        f"/csv//{alice_study}",
    ):
        answer = send(live.url, "GET", path, _bearer(live.bob))
        assert answer.status in (403, 404), (path, answer.status)
        assert live.alice.search["study_name"] not in answer.text, path


def test_unknown_routes_are_refused(live: Live) -> None:
    for method, path in (
        ("GET", "/sql-profiler"),
        ("GET", "/incompatible-rdb-schema"),
        ("GET", "/static/../../../../etc/passwd"),
        ("GET", "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd"),
        ("GET", "/api/studies/1%252F..%252F2"),
        ("PATCH", f"/api/studies/{live.alice.study_id}/note"),
    ):
        answer = send(live.url, method, path, _bearer(live.alice))
        assert answer.status in (403, 404), (method, path, answer.status)
        assert "root:" not in answer.text


def test_the_owner_can_read_and_write_notes(live: Live) -> None:
    """The allow-list is not a deny-all: the owner's own reads and notes go through."""
    alice = _bearer(live.alice)
    assert _study_names(live, alice) == [live.alice.search["study_name"]]
    own = live.alice.study_id
    for path in (f"/api/studies/{own}", f"/csv/{own}", "/dashboard", "/api/meta"):
        assert send(live.url, "GET", path, alice).status == 200, path
    version = live.system_attrs(live.alice).get("dashboard:note_ver", 0) + 1
    answer = send(live.url, "PUT", f"/api/studies/{own}/note", alice, {"version": version, "body": "mine"})
    assert answer.status == 204, answer.text
    assert "mine" in json.dumps(live.system_attrs(live.alice))


def test_cross_site_writes_with_the_session_cookie_are_refused(live: Live) -> None:
    cookie = [("Cookie", live.login(live.alice))]
    path = f"/api/studies/{live.alice.study_id}/note"
    before = _snapshot(live, live.alice)
    for headers in (
        [("Origin", "https://evil.example")],
        [("Origin", "null")],
        [("Sec-Fetch-Site", "cross-site")],
        [("Sec-Fetch-Site", "same-site"), ("Origin", "http://sub.127.0.0.1")],
        [],  # a browser always sends Origin on a PUT: without it, refuse
    ):
        version = live.system_attrs(live.alice).get("dashboard:note_ver", 0) + 1
        answer = send(live.url, "PUT", path, cookie + headers, {"version": version, "body": "csrf"})
        assert answer.status == 403, (headers, answer.status)
    assert _snapshot(live, live.alice) == before
    version = live.system_attrs(live.alice).get("dashboard:note_ver", 0) + 1
    answer = send(
        live.url, "PUT", path, [*cookie, ("Origin", live.url)], {"version": version, "body": "same site"}
    )
    assert answer.status == 204, answer.text
