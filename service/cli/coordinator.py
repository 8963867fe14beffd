"""`spsa-nas coordinator`: the process that runs searches (Dispatcher, Ray driver) until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import Any

from service.cli.common import load, settings_args
from workers.cli import UsageError

log = logging.getLogger("spsa_nas.coordinator")

PARENT_POLL_S = 1.0  # how often a coordinator started by `serve` looks whether its API is still there


def register(subparsers: Any) -> None:
    coordinator = subparsers.add_parser(
        "coordinator", help="run queued searches on Ray (the API runs none: `serve` starts one of these)"
    )
    settings_args(coordinator)
    coordinator.add_argument(
        "--concurrent-searches", type=int,
        help="searches run at once (SPSA_NAS_CONCURRENT_SEARCHES; default 1)",
    )
    coordinator.add_argument(
        "--parent-pid",
        type=int,
        help="started by `spsa-nas serve`: when that process is gone, take no new search and exit once "
        "the running ones have finished",
    )
    coordinator.set_defaults(run=_coordinate)


def _coordinate(args: argparse.Namespace) -> int:
    from service.core.db import DatabaseError
    from service.runtime import build_runtime
    from service.searches.dispatcher import Dispatcher

    settings = load(args, concurrent_searches=args.concurrent_searches)
    if settings.concurrent_searches < 1:
        raise UsageError("a coordinator needs --concurrent-searches (SPSA_NAS_CONCURRENT_SEARCHES) "
                         "of 1 or more")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    # Before Ray starts: the Dispatcher keeps these handlers across ray.init.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        runtime = build_runtime(settings)
    except DatabaseError as exc:
        raise UsageError(str(exc)) from None
    dispatcher = Dispatcher(runtime)
    try:
        dispatcher.start()
        log.info("coordinator pid %d: %d concurrent searches, Ray %s", os.getpid(),
                 settings.concurrent_searches, settings.ray_address or "in-process")
        draining = False
        while not stop.wait(PARENT_POLL_S):
            if args.parent_pid and not draining and os.getppid() != args.parent_pid:
                log.warning("coordinator: the API process %d is gone; finishing the running searches, "
                            "taking no new one", args.parent_pid)
                dispatcher.drain()
                draining = True
            if draining and dispatcher.idle():
                log.info("coordinator: the running searches have ended; exiting")
                break
    finally:
        dispatcher.stop()  # stop() after drain has nothing running: it only disconnects from Ray
        runtime.close()
    return 0
