"""Domain errors mapped to HTTP: field problems (422), quota refusals (429), a full disk (507)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.searches.submit import AdmissionError, SubmitError
from spsa_nas.errors import FieldProblem

log = logging.getLogger("spsa_nas.service")

NOT_FOUND = "search not found"  # the same for a missing id and another user's id


class FieldError(Exception):
    """A request whose fields are wrong: rendered like FastAPI's own 422 (`detail[].loc/msg/type`)."""

    def __init__(self, errors: Sequence[tuple[Sequence[str | int], str]], kind: str = "value_error") -> None:
        super().__init__("; ".join(msg for _, msg in errors))
        self.problems = [FieldProblem(tuple(loc), msg, kind) for loc, msg in errors]


class QuotaError(Exception):
    """The caller is over a per-user quota (429)."""


def _unprocessable(problems: Sequence[FieldProblem]) -> JSONResponse:
    return JSONResponse({"detail": [problem.as_dict() for problem in problems]}, status_code=422)


def allowed_methods(app: FastAPI, path: str) -> set[str]:
    """Every method the API's schema lists at `path` (Starlette's 405 names only the first route's)."""
    allowed: set[str] = set()
    for template, item in app.openapi().get("paths", {}).items():
        pattern = "[^/]+".join(re.escape(part) for part in re.split(r"\{[^/]+?\}", template))
        if re.fullmatch(pattern, path):
            allowed |= {method.upper() for method in item} | ({"HEAD"} if "get" in item else set())
    return allowed


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:  # `Allow` lists the methods of every route at this path
            listed = {m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()}
            allow = ", ".join(sorted(listed | allowed_methods(app, request.url.path)))
            exc = StarletteHTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": allow})
        return await http_exception_handler(request, exc)

    @app.exception_handler(FieldError)
    async def _field(_request: Request, exc: FieldError) -> JSONResponse:
        return _unprocessable(exc.problems)

    @app.exception_handler(SubmitError)
    async def _submit(_request: Request, exc: SubmitError) -> JSONResponse:
        # the problems name the body's fields: under `body`, as FastAPI names them
        return _unprocessable([FieldProblem(("body", *p.loc), p.msg, p.type) for p in exc.problems])

    @app.exception_handler(AdmissionError)
    async def _admission(_request: Request, exc: AdmissionError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code)

    @app.exception_handler(QuotaError)
    async def _quota(_request: Request, exc: QuotaError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        body: dict[str, Any] = {"detail": "internal error; the server log has the details"}
        return JSONResponse(body, status_code=500)
