"""optuna-dashboard behind the service's login: a per-user filtered view of the Optuna storage.

Each user gets its own dashboard WSGI app over a `UserStorage`, which exposes only the studies of
that user's searches (admins get the whole storage). Every storage call that names a study or a
trial checks it belongs to the user, so the dashboard's own routes (/api/studies/<id>, /csv/<id>,
/artifacts/<study>/<trial>/<id>, ...) answer "not found" for anyone else's. Creating, renaming and
deleting studies and telling trials are refused: the service owns the studies' life cycle.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Container, Sequence
from http.cookies import SimpleCookie
from typing import Any

from a2wsgi import WSGIMiddleware
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.study._frozen import FrozenStudy
from optuna.study._study_direction import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import wsgi as dashboard_wsgi
from sqlalchemy import text
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import Receive, Scope, Send

from service import crud
from service.api.routes.login import COOKIE
from service.models import User
from service.runtime import Runtime

# Dashboard routes that would change a study's life cycle; the service owns it (403).
_REFUSED = re.compile(
    r"^(POST /api/studies|POST /api/studies/\d+/rename|DELETE /api/studies/\d+"
    r"|POST /api/trials/\d+/(tell|user-attrs))/?$"
)
# Dashboard routes naming a study (and maybe a trial) id: checked here, answered 404 when not the
# caller's, before optuna-dashboard (which would turn the storage's KeyError into a 500) runs.
_STUDY_PATH = re.compile(r"^/(?:api/studies|csv|artifacts|api/artifacts)/(\d+)(?:/(\d+))?(?:/|$)")
_TRIAL_PATH = re.compile(r"^/api/trials/(\d+)(?:/|$)")
USER_HEADER = b"x-spsa-nas-dashboard-user"  # set by the gateway only; a client's copy is dropped
ALLOWED_TTL_S = 2.0  # how stale a user's list of studies may be (a new search shows within this)


class ReadOnlyStudyError(KeyError):
    """Refused by the service: studies are created, renamed and deleted through the API only."""


class UserStorage(BaseStorage):
    """The Optuna storage as one user sees it: only the studies in `allowed_ids()`.

    A study or trial outside them raises KeyError, which optuna-dashboard answers with 404.
    """

    def __init__(
        self,
        inner: RDBStorage,
        allowed_ids: Callable[[], Container[int]],
        study_of_trial: Callable[[int], int | None],
    ) -> None:
        self._inner = inner
        self._allowed_ids = allowed_ids
        self._study_of_trial = study_of_trial

    def _study(self, study_id: int) -> int:
        if study_id not in self._allowed_ids():
            raise KeyError(f"No study with study_id {study_id} exists.")
        return study_id

    def _trial(self, trial_id: int) -> int:
        study_id = self._study_of_trial(trial_id)
        if study_id is None or study_id not in self._allowed_ids():
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        return trial_id

    # studies
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        raise ReadOnlyStudyError("create searches through the API: POST /api/v1/searches")

    def delete_study(self, study_id: int) -> None:
        raise ReadOnlyStudyError("studies of searches cannot be deleted from the dashboard")

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        raise ReadOnlyStudyError("study user attributes are the service's")

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._inner.set_study_system_attr(self._study(study_id), key, value)  # notes, artifacts

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

    def get_all_studies(self) -> list[FrozenStudy]:
        allowed = self._allowed_ids()
        studies = [s for s in self._inner.get_all_studies() if s._study_id in allowed]
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
        self._inner.set_trial_system_attr(self._trial(trial_id), key, value)  # notes, artifacts

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


class DashboardGateway:
    """ASGI app in front of optuna-dashboard: authenticates (cookie or bearer), then serves the
    caller's own dashboard. Unauthenticated browsers are sent to /login."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._apps: dict[int, Any] = {}  # user id (0: admins) -> optuna-dashboard WSGI app
        self._allowed: dict[int, tuple[float, frozenset[int]]] = {}
        self._trial_study: dict[int, int] = {}  # trial id -> study id (never changes)
        self._lock = threading.Lock()
        self._wsgi = WSGIMiddleware(self._dispatch, workers=8)  # type: ignore[arg-type]

    # --- who may see what ------------------------------------------------------------------
    def _allowed_ids(self, user_id: int) -> frozenset[int]:
        now = time.monotonic()
        cached = self._allowed.get(user_id)
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
        self._allowed[user_id] = (now, ids)
        return ids

    def _study_of_trial(self, trial_id: int) -> int | None:
        if trial_id in self._trial_study:
            return self._trial_study[trial_id]
        with self._runtime.engine.connect() as conn:
            study_id = conn.scalar(text("SELECT study_id FROM trials WHERE trial_id = :t"), {"t": trial_id})
        if study_id is not None:
            self._trial_study[trial_id] = int(study_id)
        return study_id

    def _may_see(self, user_id: int, path: str) -> bool:
        """Whether the study (and trial) a dashboard path names are the user's."""
        study_match = _STUDY_PATH.match(path)
        if study_match:
            study_id = int(study_match.group(1))
            if study_id not in self._allowed_ids(user_id):
                return False
            trial = study_match.group(2)
            # /api/studies/<id>/<trial id>/note|skip and /artifacts/<study>/<trial>/<artifact>
            if trial is not None:
                return self._study_of_trial(int(trial)) == study_id
            return True
        trial_match = _TRIAL_PATH.match(path)
        if trial_match:
            return self._study_of_trial(int(trial_match.group(1))) in self._allowed_ids(user_id)
        return True

    def _app_for(self, user_id: int, is_admin: bool) -> Any:
        key = 0 if is_admin else user_id
        with self._lock:
            app = self._apps.get(key)
            if app is None:
                storage: BaseStorage = (
                    self._runtime.storage
                    if is_admin
                    else UserStorage(
                        self._runtime.storage, lambda: self._allowed_ids(user_id), self._study_of_trial
                    )
                )
                app = dashboard_wsgi(storage, artifact_store=self._runtime.artifact_store)
                self._apps[key] = app
            return app

    def _dispatch(self, environ: dict[str, Any], start_response: Any) -> Any:
        user_id, _, admin = environ.get("HTTP_X_SPSA_NAS_DASHBOARD_USER", "").partition(":")
        return self._app_for(int(user_id), admin == "admin")(environ, start_response)

    # --- ASGI ----------------------------------------------------------------------------------
    def _authenticate(self, scope: Scope) -> User | None:
        token = None
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                token = value[7:].decode("latin-1").strip()
            elif name == b"cookie" and token is None:
                cookie: SimpleCookie = SimpleCookie()
                try:
                    cookie.load(value.decode("latin-1"))
                except Exception:  # a malformed cookie header is just no login
                    continue
                if COOKIE in cookie:
                    token = cookie[COOKIE].value
        if not token:
            return None
        with self._runtime.sessions() as session:
            return crud.authenticate(session, token=token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        from starlette.concurrency import run_in_threadpool

        user = await run_in_threadpool(self._authenticate, scope)
        if user is None:
            path = scope.get("path", "/")
            if scope.get("method") == "GET" and (path == "/" or path.startswith("/dashboard")):
                query = scope.get("query_string", b"").decode("latin-1")
                target = path + (f"?{query}" if query else "")
                from urllib.parse import quote

                await RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)(
                    scope, receive, send
                )
            else:
                await JSONResponse({"detail": "log in first: /login"}, status_code=401)(scope, receive, send)
            return
        if _REFUSED.match(f"{scope.get('method')} {scope.get('path')}"):
            message = "searches are created, renamed, deleted and told through the API (/docs)"
            await JSONResponse({"reason": message}, status_code=403)(scope, receive, send)
            return
        if not user.is_admin and not await run_in_threadpool(self._may_see, user.id, scope.get("path", "")):
            await JSONResponse({"reason": "not found"}, status_code=404)(scope, receive, send)
            return
        tag = f"{user.id}:{'admin' if user.is_admin else 'user'}".encode()
        headers = [(k, v) for k, v in scope.get("headers", []) if k != USER_HEADER] + [(USER_HEADER, tag)]
        await self._wsgi({**scope, "headers": headers}, receive, send)
