"""Client errors with a field path (422), quota refusals (429), and the handlers that render them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger("spsa_nas.service")

NOT_FOUND = "search not found"  # the same for a missing id and another user's id


class FieldError(Exception):
    """A request whose fields are wrong: rendered like FastAPI's own 422 (`detail[].loc/msg/type`)."""

    def __init__(self, errors: Sequence[tuple[Sequence[str | int], str]], kind: str = "value_error") -> None:
        super().__init__("; ".join(msg for _, msg in errors))
        self.errors = [{"loc": list(loc), "msg": msg, "type": kind} for loc, msg in errors]


class QuotaError(Exception):
    """The caller is over a per-user quota (429)."""


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(FieldError)
    async def _field(_request: Request, exc: FieldError) -> JSONResponse:
        return JSONResponse({"detail": exc.errors}, status_code=422)

    @app.exception_handler(QuotaError)
    async def _quota(_request: Request, exc: QuotaError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        body: dict[str, Any] = {"detail": "internal error; the server log has the details"}
        return JSONResponse(body, status_code=500)
