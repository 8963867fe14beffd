"""`spsa-nas serve`: the API, the dispatcher, Ray and optuna-dashboard in one process."""

from __future__ import annotations

import argparse
from typing import Any

from service.cli.common import load, settings_args
from workers.cli import UsageError

# After SIGTERM, open requests have this long to finish before uvicorn cancels them; then the app's
# lifespan stops the dispatcher (Dispatcher.stop). docker-compose.yml's stop_grace_period covers
# both (tests/service/test_compose.py checks it).
GRACEFUL_SHUTDOWN_S = 30


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="start the service: API, dispatcher, Ray, optuna-dashboard")
    settings_args(serve)
    serve.add_argument("--host", help="address to listen on (SPSA_NAS_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (SPSA_NAS_PORT; default 8000)")
    serve.add_argument("--concurrent-searches", type=int, help="searches run at once (0: dispatcher off)")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from service.app import create_app
    from service.core.db import DatabaseError

    settings = load(args, host=args.host, port=args.port, concurrent_searches=args.concurrent_searches)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings)
    except DatabaseError as exc:
        raise UsageError(str(exc)) from None
    url = f"http://{settings.host}:{settings.port}"
    print(
        f"spsa-nas serving on {url}  (API docs {url}/docs, dashboard {url}/login)\n"
        f"  database {settings.db_url.split('@')[-1]}\n  artifacts {settings.artifact_path}\n"
        f"  data root {settings.data_root_path}\n  Ray {settings.ray_address or 'in-process'}",
        flush=True,
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        access_log=settings.access_log,
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    return 0
