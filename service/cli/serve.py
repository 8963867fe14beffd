"""`spsa-nas serve`: the API and optuna-dashboard in this process, plus a coordinator child process
(`spsa-nas coordinator`) that runs the searches and hosts Ray."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
from typing import Any

from service.cli.common import load, settings_args
from workers.cli import UsageError

# After SIGTERM, open requests have this long to finish before uvicorn cancels them; that is the
# API's whole clean stop (it runs no search). docker-compose.yml's stop_grace_period for the api
# covers it (tests/service/test_compose.py checks it).
GRACEFUL_SHUTDOWN_S = 30
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # between restarts of a coordinator that died
COORDINATOR = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main())",
               "coordinator"]

log = logging.getLogger("spsa_nas.serve")


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve", help="start the service: the API, optuna-dashboard and a coordinator process (Ray)"
    )
    settings_args(serve)
    serve.add_argument("--host", help="address to listen on (SPSA_NAS_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (SPSA_NAS_PORT; default 8000)")
    serve.add_argument(
        "--concurrent-searches", type=int, help="searches run at once (0: no coordinator, the API only)"
    )
    serve.set_defaults(run=_serve)


class CoordinatorChild:
    """The coordinator process `serve` starts beside its API, restarted (with backoff) when it dies.

    When the API ends, for any reason, the child is left alone: it sees its parent gone, takes no
    new search and exits once its running searches have finished, so restarting the API
    interrupts no trial. Ctrl-C (SIGINT to the terminal's process group) or SIGTERM to the group
    stops both: the child then stops its searches cleanly and gives their leases back.
    """

    def __init__(self, args: argparse.Namespace, concurrent_searches: int) -> None:
        self.command = [*COORDINATOR, "--parent-pid", str(os.getpid()),
                        "--concurrent-searches", str(concurrent_searches)]
        for flag, value in (("--data-dir", args.data_dir), ("--database-url", args.database_url),
                            ("--settings", args.settings)):
            if value is not None:
                self.command += [flag, str(value)]
        self.process: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="spsa-nas-coordinator-child",
                                        daemon=True)

    def start(self) -> None:
        self.process = subprocess.Popen(self.command)  # same session and process group as the API
        print(f"  coordinator pid {self.process.pid}", flush=True)
        self._thread.start()

    def _supervise(self) -> None:
        restarts = 0
        while self.process is not None:
            code = self.process.wait()
            if self._stop.is_set():
                return
            delay = RESTART_BACKOFF_S[min(restarts, len(RESTART_BACKOFF_S) - 1)]
            log.error("coordinator pid %d exited with %s; restarting it in %g s (its searches resume "
                      "when their leases expire)", self.process.pid, code, delay)
            if self._stop.wait(delay):
                return
            restarts += 1
            self.process = subprocess.Popen(self.command)
            log.warning("coordinator restarted: pid %d", self.process.pid)

    def detach(self) -> None:
        """The API is ending: stop supervising; the child finishes its searches on its own."""
        self._stop.set()


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.core.db import DatabaseError

    settings = load(args, host=args.host, port=args.port, concurrent_searches=args.concurrent_searches)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings)  # migrates the database before the coordinator opens it
    except DatabaseError as exc:
        raise UsageError(str(exc)) from None
    url = f"http://{settings.host}:{settings.port}"
    print(
        f"spsa-nas serving on {url}  (API docs {url}/docs, dashboard {url}/login)\n"
        f"  API pid {os.getpid()}\n"
        f"  database {settings.db_url.split('@')[-1]}\n  artifacts {settings.artifact_path}\n"
        f"  data root {settings.data_root_path}\n"
        f"  Ray {settings.ray_address or 'in the coordinator process'}",
        flush=True,
    )
    child = None
    if settings.concurrent_searches > 0:
        child = CoordinatorChild(args, settings.concurrent_searches)
        child.start()
    else:
        print("  no coordinator (--concurrent-searches 0): searches wait for `spsa-nas coordinator`",
              flush=True)
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            access_log=settings.access_log,
            log_level="info",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    finally:
        if child is not None:
            child.detach()
    return 0
