"""The dashboard routes the gateway lets through, and the one spelling of a path that it checks."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

from service.core.paths import ARTIFACT_ID

READ = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class Route:
    """A dashboard route the gateway lets through; `access` says what it needs of the study.

    page: no study named; read: the caller may read the study; write: the caller owns it;
    delete: the caller owns it and the named artifact belongs to that study (or trial)."""

    methods: frozenset[str]
    pattern: re.Pattern[str]
    access: str


def _route(methods: Iterable[str], pattern: str, access: str) -> Route:
    pattern = pattern.replace("{study}", r"(?P<study>\d{1,12})").replace("{trial}", r"(?P<trial>\d{1,12})")
    pattern = pattern.replace("{artifact}", f"(?P<artifact>{ARTIFACT_ID.pattern})")
    return Route(frozenset(methods), re.compile(pattern), access)


_SEGMENT = r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*"
ROUTES: tuple[Route, ...] = (
    _route(READ, "/", "page"),
    _route(READ, rf"/dashboard(?:/{_SEGMENT})*", "page"),  # the single-page app's own routes
    _route(READ, "/api/meta", "page"),
    _route(READ, "/api/studies", "page"),  # lists the studies the caller may read
    _route(READ, r"/favicon\.ico", "page"),
    _route(READ, rf"/static(?:/{_SEGMENT})+", "page"),
    _route(READ, "/api/studies/{study}", "read"),
    _route(READ, "/api/studies/{study}/param_importances", "read"),
    _route(READ, "/api/studies/{study}/plot/[a-z_]{1,32}", "read"),
    _route(READ, "/csv/{study}", "read"),
    _route(READ, "/artifacts/{study}/{artifact}", "read"),
    _route(READ, "/artifacts/{study}/{trial}/{artifact}", "read"),
    _route({"PUT"}, "/api/studies/{study}/note", "write"),
    _route({"PUT"}, "/api/studies/{study}/{trial}/note", "write"),
    _route({"POST"}, "/api/artifacts/{study}", "write"),
    _route({"POST"}, "/api/artifacts/{study}/{trial}", "write"),
    _route({"DELETE"}, "/api/artifacts/{study}/{artifact}", "delete"),
    _route({"DELETE"}, "/api/artifacts/{study}/{trial}/{artifact}", "delete"),
)
_PATH_CHARS = re.compile(r"[A-Za-z0-9._~/-]*")


def normalise_path(path: str) -> str | None:
    """The one spelling of a (percent-decoded) request path that is checked and then served:
    repeated and trailing slashes dropped, `.` and `..` resolved. None when it holds anything
    but letters, digits and `._~-/` (a `%` left after decoding, a backslash, a NUL, ...)."""
    if not path.startswith("/") or not _PATH_CHARS.fullmatch(path):
        return None
    normal = posixpath.normpath("/" + path.lstrip("/"))
    return "/" + normal.lstrip("/")


def match_route(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    for route in ROUTES:
        found = route.pattern.fullmatch(path)
        if found and method in route.methods:
            return route, {k: v for k, v in found.groupdict().items() if v is not None}
    return None
