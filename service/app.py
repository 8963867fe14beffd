"""The FastAPI application: create_app(settings) wires routers, limits, the dashboard; runs no search."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi

from service.api.errors import install_handlers
from service.api.limits import BodySizeLimit
from service.api.routes import compare, downloads, health, login, maps, remeasure, searches, spaces
from service.api.schemas import Message, with_quotas
from service.core.settings import Settings
from service.runtime import Runtime, build_runtime

API_PREFIX = "/api/v1"
log = logging.getLogger("spsa_nas.service")


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> FastAPI:
    """The service's ASGI app. Builds the runtime (migrating the database) unless one is given.

    It only serves: searches are run by coordinator processes (`spsa-nas coordinator`, which
    `spsa-nas serve` starts beside it), so this process hosts no Ray driver and imports no torch
    on its request path (tests/service/test_processes.py checks it)."""
    runtime = runtime or build_runtime(settings)

    app = FastAPI(
        title="spsa-nas",
        version="0.1.0",
        # operationId = the route function's name (create_search, read_best, ...): what generated
        # clients call their methods, and what the links of a created search name
        generate_unique_id_function=lambda route: route.name,
        description="Neural-architecture search around SPSA: submit searches, watch them, "
        "download the best architecture. Authenticate with `Authorization: Bearer "
        "<token>` (tokens: `spsa-nas users add NAME`). optuna-dashboard: /login.",
    )
    app.state.runtime = runtime
    install_handlers(app)
    api = APIRouter(
        prefix=API_PREFIX,
        responses={401: {"model": Message, "description": "missing or invalid bearer token"}},
    )
    api.include_router(searches.router)
    api.include_router(downloads.router)
    api.include_router(maps.router)
    api.include_router(compare.router)
    api.include_router(remeasure.router)
    api.include_router(spaces.router)
    app.include_router(api)
    app.include_router(health.router)
    app.include_router(login.router)
    if settings.dashboard:
        from service.dashboard import DashboardGateway

        # Every path none of our routes has (not a mount at `/`: a path of ours asked with a
        # method it lacks must answer 405 with `Allow`, as the schema promises, not reach the dashboard).
        app.router.default = DashboardGateway(runtime)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with this server's quotas as the maxima of a search's body."""
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            app.openapi_schema = with_quotas(document, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
