"""optuna-dashboard behind the service's login: an allow-listed gateway and per-caller scoped storages.

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

import posixpath
import re
import threading
import time
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import quote

from a2wsgi import WSGIMiddleware
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import wsgi as dashboard_wsgi
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import Receive, Scope, Send

from service import crud
from service.api.routes.login import COOKIE
from service.artifacts import ARTIFACT_ID
from service.models import User
from service.runtime import Runtime
from service.security import same_origin

CALLER_KEY = "spsa_nas.caller"  # ASGI scope key; an object, never a header
ALLOWED_TTL_S = 2.0  # how stale a user's list of studies may be (a new search shows within this)
READ = frozenset({"GET", "HEAD"})
ARTIFACTS_PREFIX = "artifacts:"  # where Optuna and optuna-dashboard record an artifact's metadata
DASHBOARD_ARTIFACTS_PREFIX = "dashboard:artifacts:"
# Artifacts are served inline only with these types (images and plain data); any other type is
# served as application/octet-stream. All are attachments, nosniff, and sandboxed.
INLINE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "text/plain", "text/csv")


class ReadOnlyStudyError(KeyError):
    """Refused by the service: studies are created, renamed, deleted and told through the API only."""


@dataclass(frozen=True)
class Caller:
    """Who the gateway authenticated. Admins' and users' apps live under different keys."""

    user_id: int
    is_admin: bool

    @property
    def key(self) -> tuple[str, int]:
        return ("admin" if self.is_admin else "user", self.user_id)


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


class ScopedStorage(BaseStorage):
    """The Optuna storage as one caller's dashboard sees it.

    `readable(study_id)` and `writable(study_id)` decide; a study or trial the caller may not read
    raises KeyError (optuna-dashboard answers 404). Writes other than system attrs (notes and
    artifact records) are refused for everyone: the service owns the studies' life cycle.
    """

    def __init__(
        self,
        inner: RDBStorage,
        readable: Callable[[int], bool],
        writable: Callable[[int], bool],
        study_of_trial: Callable[[int], int | None],
    ) -> None:
        self._inner = inner
        self._readable = readable
        self._writable = writable
        self._study_of_trial = study_of_trial

    def _study(self, study_id: int) -> int:
        if not self._readable(study_id):
            raise KeyError(f"No study with study_id {study_id} exists.")
        return study_id

    def _trial(self, trial_id: int) -> int:
        study_id = self._study_of_trial(trial_id)
        if study_id is None or not self._readable(study_id):
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        return trial_id

    def _writable_study(self, study_id: int) -> int:
        if not self._writable(self._study(study_id)):
            raise ReadOnlyStudyError("only the owner of a search writes notes and files on its study")
        return study_id

    # studies
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        raise ReadOnlyStudyError("create searches through the API: POST /api/v1/searches")

    def delete_study(self, study_id: int) -> None:
        raise ReadOnlyStudyError("studies of searches cannot be deleted from the dashboard")

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        raise ReadOnlyStudyError("study user attributes are the service's")

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._inner.set_study_system_attr(self._writable_study(study_id), key, value)  # notes, files

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._study(self._inner.get_study_id_from_name(study_name))

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._inner.get_study_name_from_id(self._study(study_id))

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._inner.get_study_directions(self._study(study_id))

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._inner.get_study_user_attrs(self._study(study_id))

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._inner.get_study_system_attrs(self._study(study_id))

    def get_all_studies(self) -> list[Any]:
        studies = [s for s in self._inner.get_all_studies() if self._readable(s._study_id)]
        return sorted(studies, key=lambda s: s._study_id)

    # trials
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        raise ReadOnlyStudyError("trials are created by the search's workers")

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        raise ReadOnlyStudyError("trials are written by the search's workers")

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        raise ReadOnlyStudyError("trials are told by the search's workers")

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        raise ReadOnlyStudyError("trials are written by the search's workers")

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        raise ReadOnlyStudyError("trial user attributes are the search's results")

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        study_id = self._study_of_trial(self._trial(trial_id))
        self._writable_study(int(study_id))  # type: ignore[arg-type]
        self._inner.set_trial_system_attr(trial_id, key, value)  # files attached to a running trial

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._inner.get_trial_id_from_study_id_trial_number(self._study(study_id), trial_number)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._inner.get_trial(self._trial(trial_id))

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._inner.get_all_trials(self._study(study_id), deepcopy=deepcopy, states=states)

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self._inner.get_n_trials(self._study(study_id), state)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._inner.get_best_trial(self._study(study_id))

    def remove_session(self) -> None:
        self._inner.remove_session()

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self._inner.check_trial_is_updatable(trial_id, trial_state)


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

