"""The FastAPI application: create_app(settings) wires routers, limits, the dashboard and the dispatcher."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from service.api.errors import install_handlers
from service.api.limits import BodySizeLimit
from service.api.routes import health, login, searches, spaces
from service.core.settings import Settings
from service.runtime import Runtime, build_runtime

API_PREFIX = "/api/v1"
log = logging.getLogger("spsa_nas.service")


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> FastAPI:
    """The service's ASGI app. Builds the runtime (migrating the database) unless one is given;
    the dispatcher runs in the app's lifespan when settings.concurrent_searches > 0."""
    runtime = runtime or build_runtime(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        dispatcher = None
        if settings.concurrent_searches > 0:
            from service.searches.dispatcher import Dispatcher

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
