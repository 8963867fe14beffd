"""The FastAPI application: create_app(settings) wires routers, limits, the dashboard and the dispatcher."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import install_handlers
from service.api.routes import health, login, searches, spaces
from service.runtime import Runtime, build_runtime
from service.settings import Settings

API_PREFIX = "/api/v1"
log = logging.getLogger("spsa_nas.service")


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413, whether or not they declare a length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send) -> None:
        body = f'{{"detail":"request body over the limit of {self.max_bytes} bytes"}}'.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.max_bytes + 1
                if declared > self.max_bytes:
                    await self._refuse(send)
                    return
        if scope["method"] not in ("POST", "PUT", "PATCH", "DELETE"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> FastAPI:
    """The service's ASGI app. Builds the runtime (migrating the database) unless one is given;
    the dispatcher runs in the app's lifespan when settings.concurrent_searches > 0."""
    runtime = runtime or build_runtime(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        dispatcher = None
        if settings.concurrent_searches > 0:
            from service.dispatcher import Dispatcher

            dispatcher = Dispatcher(runtime)
            dispatcher.start()
        try:
            yield
        finally:
            if dispatcher is not None:
                dispatcher.stop()

    app = FastAPI(
        title="spsa-nas",
        version="0.1.0",
        lifespan=lifespan,
        description="Neural-architecture search around SPSA: submit searches, watch them, "
        "download the best architecture. Authenticate with `Authorization: Bearer "
        "<token>` (tokens: `spsa-nas users add NAME`). optuna-dashboard: /login.",
    )
    app.state.runtime = runtime
    install_handlers(app)
    api = APIRouter(prefix=API_PREFIX)
    api.include_router(searches.router)
    api.include_router(spaces.router)
    app.include_router(api)
    app.include_router(health.router)
    app.include_router(login.router)
    if settings.dashboard:
        from service.dashboard import DashboardGateway

        app.mount("/", DashboardGateway(runtime))  # after our routes: it owns the rest of the paths
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
