"""The dashboard gateway: authenticates, allow-lists routes, checks ownership, runs the caller's app.

The gateway (ASGI) authenticates the caller (session cookie or bearer token), normalises the path,
lets through only the dashboard routes and methods listed in ROUTES, checks that the study (and
trial, and artifact) a route names is the caller's to read or write, and only then runs the
optuna-dashboard WSGI app of that caller. Who the caller is travels out of band, as an object in
the ASGI scope (which a2wsgi hands to the WSGI app as environ["asgi.scope"]); no HTTP header
a client sends can reach it. Each caller's app is backed by a `ScopedStorage` that enforces the
same rules again: users read and write their own studies; admins read every study and write
only their own; nobody creates, renames, deletes or tells through the dashboard.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import quote

from a2wsgi import WSGIMiddleware
from optuna_dashboard import wsgi as dashboard_wsgi
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import Receive, Scope, Send

from service import crud
from service.api.routes.login import COOKIE
from service.core.models import User
from service.core.security import same_origin
from service.dashboard.routes import READ, Route, match_route, normalise_path
from service.dashboard.storage import ScopedStorage
from service.runtime import Runtime

CALLER_KEY = "spsa_nas.caller"  # ASGI scope key; an object, never a header
ALLOWED_TTL_S = 2.0  # how stale a user's list of studies may be (a new search shows within this)
ARTIFACTS_PREFIX = "artifacts:"  # where Optuna and optuna-dashboard record an artifact's metadata
DASHBOARD_ARTIFACTS_PREFIX = "dashboard:artifacts:"
# Artifacts are served inline only with these types (images and plain data); any other type is
# served as application/octet-stream. All are attachments, nosniff, and sandboxed.
INLINE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "text/plain", "text/csv")


@dataclass(frozen=True)
class Caller:
    """Who the gateway authenticated. Admins' and users' apps live under different keys."""

    user_id: int
    is_admin: bool

    @property
    def key(self) -> tuple[str, int]:
        return ("admin" if self.is_admin else "user", self.user_id)


def _json(status_code: int, reason: str) -> JSONResponse:
    return JSONResponse({"reason": reason}, status_code=status_code, headers={"Cache-Control": "no-store"})


def _artifact_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """An artifact is a download: never rendered as a page of this origin, never sniffed."""
    kept = [
        (k, v)
        for k, v in headers
        if k.lower()
        not in (
            "content-type",
            "content-disposition",
            "content-security-policy",
            "access-control-allow-origin",
            "content-encodings",
            "content-encoding",
        )
    ]
    media = next((v for k, v in headers if k.lower() == "content-type"), "")
    media = media.split(";", 1)[0].strip().lower()
    return [
        *kept,
        ("Content-Type", media if media in INLINE_TYPES else "application/octet-stream"),
        ("Content-Disposition", "attachment"),
        ("Content-Security-Policy", "sandbox; default-src 'none'"),
    ]


class DashboardGateway:
    """ASGI app in front of optuna-dashboard: authenticates (session cookie or bearer), allows
    listed routes only, checks ownership, then serves the caller's own dashboard. Unauthenticated
    browsers are sent to /login."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._apps: dict[tuple[str, int], Any] = {}  # Caller.key -> optuna-dashboard WSGI app
        self._owned: dict[int, tuple[float, frozenset[int]]] = {}
        self._trial_study: dict[int, int] = {}  # trial id -> study id (never changes)
        self._lock = threading.Lock()
        self._wsgi = WSGIMiddleware(self._dispatch, workers=8)  # type: ignore[arg-type]

    # --- who may see what ------------------------------------------------------------------
    def _owned_ids(self, user_id: int) -> frozenset[int]:
        """Study ids of the user's searches (cached for ALLOWED_TTL_S)."""
        now = time.monotonic()
        cached = self._owned.get(user_id)
        if cached and now - cached[0] < ALLOWED_TTL_S:
            return cached[1]
        with self._runtime.engine.connect() as conn:
            ids = frozenset(
                conn.scalars(
                    text(
                        "SELECT studies.study_id FROM studies JOIN searches"
                        " ON searches.study_name = studies.study_name WHERE searches.owner_id = :owner"
                    ),
                    {"owner": user_id},
                )
            )
        self._owned[user_id] = (now, ids)
        return ids

    def _study_of_trial(self, trial_id: int) -> int | None:
        if trial_id in self._trial_study:
            return self._trial_study[trial_id]
        with self._runtime.engine.connect() as conn:
            study_id = conn.scalar(text("SELECT study_id FROM trials WHERE trial_id = :t"), {"t": trial_id})
        if study_id is not None:
            self._trial_study[trial_id] = int(study_id)
        return study_id

    def _study_exists(self, study_id: int) -> bool:
        with self._runtime.engine.connect() as conn:
            found = conn.scalar(text("SELECT 1 FROM studies WHERE study_id = :s"), {"s": study_id})
        return found is not None

    def _readable(self, caller: Caller) -> Callable[[int], bool]:
        if caller.is_admin:
            return lambda _study_id: True
        return lambda study_id: study_id in self._owned_ids(caller.user_id)

    def _writable(self, caller: Caller) -> Callable[[int], bool]:
        return lambda study_id: study_id in self._owned_ids(caller.user_id)

    def _artifact_belongs(self, study_id: int, trial_id: int | None, artifact_id: str) -> bool:
        """Whether the study's (or trial's) records name this artifact: a caller deletes only files
        of their own studies, whatever ids they put in the path."""
        storage = self._runtime.storage
        if trial_id is None:
            return storage.get_study_system_attrs(study_id).get(ARTIFACTS_PREFIX + artifact_id) is not None
        dashboard_key = f"{DASHBOARD_ARTIFACTS_PREFIX}{trial_id}:{artifact_id}"
        if storage.get_study_system_attrs(study_id).get(dashboard_key) is not None:
            return True
        return storage.get_trial_system_attrs(trial_id).get(ARTIFACTS_PREFIX + artifact_id) is not None

    def _check(self, caller: Caller, route: Route, params: dict[str, str]) -> JSONResponse | None:
        """None when the caller may use this route on these ids; else the answer (404: not yours or
        no such thing, told apart by nobody; 403: yours to see but not to change)."""
        if route.access == "page":
            return None
        study_id = int(params["study"])
        readable = self._readable(caller)(study_id) and (not caller.is_admin or self._study_exists(study_id))
        if not readable:
            return _json(404, "not found")
        if "trial" in params and self._study_of_trial(int(params["trial"])) != study_id:
            return _json(404, "not found")
        if route.access == "read":
            return None
        if not self._writable(caller)(study_id):
            return _json(403, "only the owner of a search writes notes and files on its study")
        if route.access == "delete":
            trial_id = int(params["trial"]) if "trial" in params else None
            if not self._artifact_belongs(study_id, trial_id, params["artifact"]):
                return _json(404, "no such file in this study")
            if trial_id is not None and self._runtime.storage.get_trial(trial_id).state.is_finished():
                return _json(403, "the files of a finished trial are the search's results: they stay")
        return None

    def _app_for(self, caller: Caller) -> Any:
        with self._lock:
            app = self._apps.get(caller.key)
            if app is None:
                readable, writable = self._readable(caller), self._writable(caller)
                storage = ScopedStorage(self._runtime.storage, readable, writable, self._study_of_trial)
                app = dashboard_wsgi(storage, artifact_store=self._runtime.artifact_store)
                self._apps[caller.key] = app
            return app

    def _dispatch(self, environ: dict[str, Any], start_response: Any) -> Any:
        scope = environ.get("asgi.scope") or {}
        caller = scope.get(CALLER_KEY)
        if not isinstance(caller, Caller):  # only the gateway puts a Caller there; fail closed
            start_response("403 Forbidden", [("Content-Type", "application/json")])
            return [b'{"reason": "forbidden"}']
        is_artifact = environ.get("PATH_INFO", "").startswith("/artifacts/")

        def secured_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers = _artifact_headers(headers) if is_artifact else list(headers)
            headers += [
                ("X-Content-Type-Options", "nosniff"),
                ("X-Frame-Options", "SAMEORIGIN"),
                ("Referrer-Policy", "same-origin"),
            ]
            if not any(k.lower() == "cache-control" for k, _ in headers):
                headers.append(("Cache-Control", "private, no-cache"))
            return start_response(status, headers, exc_info)

        return self._app_for(caller)(environ, secured_start_response)

    # --- ASGI ----------------------------------------------------------------------------------
    def _authenticate(self, scope: Scope) -> tuple[User | None, bool]:
        """(the user, whether a session cookie, not a bearer token, authenticated them)."""
        bearer, session_id = None, None
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                bearer = value[7:].decode("latin-1").strip()
            elif name == b"cookie":
                cookie: SimpleCookie = SimpleCookie()
                try:
                    cookie.load(value.decode("latin-1"))
                except CookieError:  # a malformed cookie header is just no login
                    continue
                if COOKIE in cookie:
                    session_id = cookie[COOKIE].value
        with self._runtime.sessions() as session:
            if bearer:
                return crud.authenticate(session, token=bearer), False
            if session_id:
                return crud.session_user(session, session_id=session_id), True
        return None, False

    @staticmethod
    def _header(scope: Scope, name: bytes) -> str | None:
        values = [v.decode("latin-1") for k, v in scope.get("headers", []) if k == name]
        return ",".join(values) if values else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        method = scope.get("method", "GET")
        path = normalise_path(scope.get("path", "/"))
        if path is None:
            await _json(403, "this path is not served")(scope, receive, send)
            return
        user, by_cookie = await run_in_threadpool(self._authenticate, scope)
        if user is None:
            if method in READ and (path == "/" or path.startswith("/dashboard")):
                query = scope.get("query_string", b"").decode("latin-1")
                target = path + (f"?{query}" if query else "")
                await RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)(
                    scope, receive, send
                )
            else:
                await _json(401, "log in first: /login")(scope, receive, send)
            return
        matched = match_route(method, path)
        if matched is None:
            reason = "the dashboard is read-only but for notes and files; searches change through the API"
            await _json(403, f"{method} {path} is not allowed; {reason} (/docs)")(scope, receive, send)
            return
        route, params = matched
        if by_cookie and method not in READ:
            allowed = same_origin(
                origin=self._header(scope, b"origin"),
                sec_fetch_site=self._header(scope, b"sec-fetch-site"),
                host=self._header(scope, b"host"),
                require=True,
            )
            if not allowed:
                await _json(403, "cross-site request refused")(scope, receive, send)
                return
        caller = Caller(user.id, user.is_admin)
        refused = await run_in_threadpool(self._check, caller, route, params)
        if refused is not None:
            await refused(scope, receive, send)
            return
        inner = {**scope, "path": path, "raw_path": path.encode(), CALLER_KEY: caller}
        await self._wsgi(inner, receive, send)
