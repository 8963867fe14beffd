"""The dashboard gateway's rules as functions: path normalisation, the route allow-list, same-origin."""

from __future__ import annotations

import pytest

from service.core.security import same_origin
from service.dashboard import Caller, match_route, normalise_path


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/", "/"),
        ("//", "/"),
        ("/api/studies/1", "/api/studies/1"),
        ("/api/studies/1/", "/api/studies/1"),
        ("/api/studies/1///", "/api/studies/1"),
        ("//api//studies//1", "/api/studies/1"),
        ("/api/x/../studies/1", "/api/studies/1"),
        ("/api/./studies/./1", "/api/studies/1"),
        ("/../../api/studies/1", "/api/studies/1"),
        ("/static/../../etc/passwd", "/etc/passwd"),
    ],
)
def test_paths_are_normalised_before_they_are_checked(raw: str, normal: str) -> None:
    assert normalise_path(raw) == normal


@pytest.mark.parametrize(
    "raw",
    ["", "api/studies", "/api/studies/1%2F", "/api/%2e%2e/x", "/a\\b", "/a\x00b", "/a b", "/é", "/a;b"],
)
def test_paths_with_anything_else_are_refused(raw: str) -> None:
    assert normalise_path(raw) is None


ALLOWED = [
    ("GET", "/"),
    ("GET", "/dashboard"),
    ("GET", "/dashboard/studies/3"),
    ("HEAD", "/dashboard/studies/3/analytics"),
    ("GET", "/api/meta"),
    ("GET", "/api/studies"),
    ("GET", "/api/studies/3"),
    ("GET", "/api/studies/3/param_importances"),
    ("GET", "/api/studies/3/plot/pareto_front"),
    ("GET", "/csv/3"),
    ("GET", "/static/bundle.js"),
    ("GET", "/favicon.ico"),
    ("GET", "/artifacts/3/0d7e4b7e-1c2a-4b1e-9f55-7c1d2e3f4a5b"),
    ("GET", "/artifacts/3/9/0d7e4b7e-1c2a-4b1e-9f55-7c1d2e3f4a5b"),
    ("PUT", "/api/studies/3/note"),
    ("PUT", "/api/studies/3/9/note"),
    ("POST", "/api/artifacts/3"),
    ("POST", "/api/artifacts/3/9"),
    ("DELETE", "/api/artifacts/3/0d7e4b7e-1c2a-4b1e-9f55-7c1d2e3f4a5b"),
    ("DELETE", "/api/artifacts/3/9/0d7e4b7e-1c2a-4b1e-9f55-7c1d2e3f4a5b"),
]
REFUSED = [
    ("POST", "/api/studies"),
    ("DELETE", "/api/studies/3"),
    ("POST", "/api/studies/3/rename"),
    ("POST", "/api/trials/9/tell"),
    ("POST", "/api/trials/9/user-attrs"),
    ("POST", "/api/studies/3/9/skip"),
    ("POST", "/api/studies/3/preference"),
    ("DELETE", "/api/studies/3/preference/abc"),
    ("PUT", "/api/studies/3/preference_feedback_component"),
    ("POST", "/api/llm/trial_filter_query"),
    ("GET", "/incompatible-rdb-schema"),
    ("POST", "/incompatible-rdb-schema"),
    ("GET", "/sql-profiler"),
    ("POST", "/api/studies/3/note"),  # the right path with the wrong method
    ("DELETE", "/api/studies/3/note"),
    ("PATCH", "/api/studies/3/note"),
    ("OPTIONS", "/api/studies"),
    ("GET", "/artifacts/3/../../etc"),
    ("GET", "/artifacts/3/not-a-uuid"),
    ("DELETE", "/api/artifacts/3/9/0D7E4B7E-1C2A-4B1E-9F55-7C1D2E3F4A5B"),  # not the shape we write
    ("GET", "/api/studies/-1"),
    ("GET", "/api/studies/99999999999999999999"),
]


@pytest.mark.parametrize(("method", "path"), ALLOWED)
def test_the_allow_list_lets_the_dashboard_work(method: str, path: str) -> None:
    assert match_route(method, path) is not None


@pytest.mark.parametrize(("method", "path"), REFUSED)
def test_everything_else_is_refused(method: str, path: str) -> None:
    assert match_route(method, path) is None


def test_admin_and_user_apps_never_share_a_key() -> None:
    assert Caller(1, is_admin=True).key != Caller(1, is_admin=False).key
    assert Caller(0, is_admin=False).key != Caller(0, is_admin=True).key


@pytest.mark.parametrize(
    ("origin", "fetch_site", "require", "ok"),
    [
        (None, "same-origin", True, True),
        (None, "none", True, True),
        (None, "same-site", True, False),
        (None, "cross-site", True, False),
        ("https://evil.example", "same-origin", True, True),  # Sec-Fetch-Site wins: browsers set it
        ("http://spsa.example:8000", None, True, True),
        ("http://SPSA.example:8000/", None, True, True),
        ("http://spsa.example:8001", None, True, False),
        ("http://evil.example", None, True, False),
        ("null", None, True, False),
        ("spsa.example:8000", None, True, False),
        (None, None, True, False),
        (None, None, False, True),  # a script without browser headers, where that is allowed
    ],
)
def test_same_origin(origin: str | None, fetch_site: str | None, require: bool, ok: bool) -> None:
    host = "spsa.example:8000"
    assert same_origin(origin=origin, sec_fetch_site=fetch_site, host=host, require=require) is ok
