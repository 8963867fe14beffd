"""/login and /logout: a browser trades its token for an HttpOnly cookie that the dashboard accepts."""

from __future__ import annotations

import html
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from service import crud
from service.api.deps import SessionDep, SettingsDep

router = APIRouter(include_in_schema=False)
COOKIE = "spsa_nas_token"
COOKIE_MAX_AGE_S = 7 * 24 * 3600
MAX_FORM_BYTES = 4096

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>spsa-nas: log in</title></head>
<body style="font-family:sans-serif;max-width:32em;margin:4em auto">
<h1>spsa-nas</h1><p>{message}</p>
<form method="post" action="/login"><input type="hidden" name="next" value="{next}">
<label>Token <input type="password" name="token" size="48" autofocus></label>
<button type="submit">Log in</button></form>
<p>A token comes from <code>spsa-nas users add NAME</code>.</p></body></html>"""


def safe_next(value: str | None) -> str:
    """Only local paths: no open redirect to another site."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/dashboard"
    return value


def _page(message: str, next_: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(
        _PAGE.format(message=html.escape(message), next=html.escape(next_)), status_code=status_code
    )


def _login(session: SessionDep, secure: bool, token: str, next_: str) -> Response:
    if crud.authenticate(session, token=token) is None:
        return _page("That token is not valid (or was revoked).", next_, status_code=401)
    response = RedirectResponse(next_, status_code=303)
    response.set_cookie(COOKIE, token, max_age=COOKIE_MAX_AGE_S, httponly=True, samesite="lax", secure=secure)
    return response


@router.get("/login")
def login_page(
    session: SessionDep,
    settings: SettingsDep,
    token: Annotated[str | None, Query()] = None,
    next: Annotated[str | None, Query()] = None,
) -> Response:
    """The login form; with ?token=... it logs in at once (handy for scripts and links)."""
    next_ = safe_next(next)
    if token:
        return _login(session, settings.cookie_secure, token, next_)
    return _page("Log in with your API token to see your searches in optuna-dashboard.", next_)


@router.post("/login")
async def login_form(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return _page("The form is too large.", "/dashboard", status_code=413)
    form = parse_qs(body.decode("utf-8", "replace"))
    next_ = safe_next((form.get("next") or [None])[0])
    return _login(session, settings.cookie_secure, (form.get("token") or [""])[0].strip(), next_)


@router.get("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response
