"""/login and /logout: a browser trades its token (POSTed, never in a URL) for a server-side session."""

from __future__ import annotations

import html
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from service import crud
from service.api.deps import SessionDep, SettingsDep
from service.core.security import same_origin

router = APIRouter(include_in_schema=False)
COOKIE = "spsa_nas_session"  # an opaque session id; the table web_sessions holds its hash
MAX_FORM_BYTES = 4096

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>spsa-nas: log in</title></head>
<body style="font-family:sans-serif;max-width:32em;margin:4em auto">
<h1>spsa-nas</h1><p>{message}</p>
<form method="post" action="/login"><input type="hidden" name="next" value="{next}">
<label>Token <input type="password" name="token" size="48" autocomplete="off" autofocus></label>
<button type="submit">Log in</button></form>
<p>A token comes from <code>spsa-nas users add NAME</code>.</p></body></html>"""

_LOGOUT_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>spsa-nas: log out</title></head>
<body style="font-family:sans-serif;max-width:32em;margin:4em auto">
<h1>spsa-nas</h1><form method="post" action="/logout"><button type="submit">Log out</button></form>
</body></html>"""

# Pages of the login flow are never framed, cached or sniffed.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "same-origin",
}


def safe_next(value: str | None) -> str:
    """Only local paths: no open redirect to another site."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/dashboard"
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):  # no header splitting, no spaces
        return "/dashboard"
    return value


def _page(message: str, next_: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(
        _PAGE.format(message=html.escape(message), next=html.escape(next_)),
        status_code=status_code,
        headers=PAGE_HEADERS,
    )


def from_this_site(request: Request, *, require: bool) -> bool:
    """The CSRF check of a state-changing browser request (see security.same_origin)."""
    return same_origin(
        origin=request.headers.get("origin"),
        sec_fetch_site=request.headers.get("sec-fetch-site"),
        host=request.headers.get("host"),
        require=require,
    )


@router.get("/login")
def login_page(
    token: Annotated[str | None, Query(include_in_schema=False)] = None,
    next: Annotated[str | None, Query()] = None,
) -> Response:
    """The login form. A token in the URL is refused: URLs end up in logs, history and Referer."""
    next_ = safe_next(next)
    if token is not None:
        return _page(
            "A token in a URL is refused (it would be kept in logs and browser history): "
            "paste it in the form, or send it as 'Authorization: Bearer <token>'.",
            next_,
            status_code=400,
        )
    return _page("Log in with your API token to see your searches in optuna-dashboard.", next_)


@router.post("/login")
async def login_form(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """Check the token, open a session, set its id as an HttpOnly cookie, go to `next`."""
    # A browser posting from another site (login CSRF) is refused; scripts without browser headers
    # (curl, the CLI) may post.
    if not from_this_site(request, require=False):
        return _page("Log in from this site's own form.", "/dashboard", status_code=403)
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return _page("The form is too large.", "/dashboard", status_code=413)
    form = parse_qs(body.decode("utf-8", "replace"))
    next_ = safe_next((form.get("next") or [None])[0])
    token = (form.get("token") or [""])[0].strip()
    opened = crud.open_web_session(
        session, token=token, ttl_s=settings.session_ttl_s, max_per_user=settings.max_sessions_per_user
    )
    if opened is None:
        return _page("That token is not valid (or was revoked).", next_, status_code=401)
    session.commit()
    response = RedirectResponse(next_, status_code=303, headers={"Cache-Control": "no-store"})
    response.set_cookie(
        COOKIE,
        opened[0],
        max_age=settings.session_ttl_s,
        path="/",
        httponly=True,
        samesite="lax",
        secure=settings.cookie_secure,
    )
    return response


@router.get("/logout")
def logout_page() -> Response:
    """A button that logs out (a GET changes nothing: a link or an image cannot log you out)."""
    return HTMLResponse(_LOGOUT_PAGE, headers=PAGE_HEADERS)


@router.post("/logout")
def logout(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """End the session on the server and forget the cookie."""
    if not from_this_site(request, require=False):
        return HTMLResponse(_LOGOUT_PAGE, status_code=403, headers=PAGE_HEADERS)
    session_id = request.cookies.get(COOKIE)
    if session_id:
        crud.end_web_session(session, session_id=session_id)
        session.commit()
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax", secure=settings.cookie_secure)
    return response
