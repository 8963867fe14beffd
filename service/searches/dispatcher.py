"""The dispatcher: threads that take queued searches from the database and run them on Ray.

A search is claimed with a lease (compare-and-set on its row) that a watcher thread extends while
it runs; a server that dies stops renewing, so after `lease_s` another (or the restarted) server
takes the search over and the runner resumes its study: finished trials are kept, none is run
twice. On shutdown the leases are given back at once, so a restart resumes without waiting.

Cancellation is one fact, the row's status `cancelling` (set by the API), and the watcher is its
one poller: it reads the status of the searches it runs every `dispatcher_poll_s` and tells the
runner through `should_cancel`; the runner's coordinator tells its own workers.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable

from search_spaces.run import RunReport
from service import crud
from service.core.models import CANCELLED, CANCELLING, COMPLETED, FAILED, Search
from service.runtime import Runtime

log = logging.getLogger("spsa_nas.dispatcher")

# run_search(study_name, storage_url, *, artifact_dir, ray_address, should_cancel) -> RunReport
Runner = Callable[..., RunReport]


def ray_runner(trial_lease_s: float, trial_nice: int = 0) -> Runner:
    """workers.ray_runner.run_search with this service's trial lease and trial CPU niceness."""
    from functools import partial

    from workers.ray_runner import RunnerOptions, run_search

    return partial(run_search, options=RunnerOptions(lease_s=trial_lease_s, nice=trial_nice or None))


class Dispatcher:
    """`settings.concurrent_searches` threads running searches, plus one watcher of their rows."""

    def __init__(self, runtime: Runtime, *, runner: Runner | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.owner = f"spsa-nas-{uuid.uuid4()}"  # this process's claims
        self._runner = runner
        self._stop = threading.Event()
        self._held: dict[str, str] = {}  # search id -> last known status ("lost": claim taken away)
        self._held_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._started_ray = False

    def _connect_ray(self) -> None:
        """Start (or join) Ray once for all searches of this process, from the main thread.

        run_search shuts down a Ray it started itself at its end, which would pull Ray from
        under the other searches running in this process: so the dispatcher owns it.
        """
        import ray

        if ray.is_initialized():
            return
        address = self.settings.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        # ray.init replaces SIGTERM's handler with one that exits at once; keep the server's
        # (uvicorn's graceful shutdown, which stops the dispatcher and gives leases back).
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            if address == "local":
                ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
        finally:
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
        self._started_ray = True
        log.info("dispatcher: Ray %s", "started in-process" if address == "local" else f"at {address}")

    def start(self) -> None:
        if self._runner is None:
            self._connect_ray()
        for i in range(self.settings.concurrent_searches):
            thread = threading.Thread(target=self._work, name=f"spsa-nas-dispatcher-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        watcher = threading.Thread(target=self._watch, name="spsa-nas-search-watcher", daemon=True)
        watcher.start()
        self._threads.append(watcher)
        log.info("dispatcher %s: %d concurrent searches", self.owner, self.settings.concurrent_searches)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop taking work, ask running searches to stop, give their leases back."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s  # one deadline for all: the threads stop together
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._started_ray:
            import ray

            ray.shutdown()

    # --- the work loop ------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                with self.runtime.sessions() as session:
                    search = crud.claim_next_search(session, owner=self.owner, lease_s=self.settings.lease_s)
            except Exception:
                log.exception("dispatcher: cannot claim a search (database unreachable?)")
                search = None
            if search is None:
                self._stop.wait(self.settings.dispatcher_poll_s)
                continue
            self._run(search)

    def _should_cancel(self, search_id: str) -> bool:
        if self._stop.is_set():
            return True
        with self._held_lock:
            return self._held.get(search_id) in (CANCELLING, "lost")

    def _run(self, search: Search) -> None:
        search_id = search.id
        with self._held_lock:
            self._held[search_id] = search.status
        log.info("search %s: running (attempt %d)", search_id, search.attempts)
        status: str | None = COMPLETED
        error, result = None, None
        try:
            if search.status == CANCELLING:
                status = CANCELLED
            else:
                runner = self._runner or ray_runner(self.settings.trial_lease_s, self.settings.trial_nice)
                report = runner(
                    search.study_name,  # the study holds the config: the runner reads it there
                    self.settings.db_url,
                    artifact_dir=str(self.settings.artifact_path),
                    ray_address=self.settings.ray_address,
                    should_cancel=lambda: self._should_cancel(search_id),
                )
                result = report.to_json()
                status = self._outcome(search_id, report)
        except Exception as exc:
            if self._stop.is_set():  # interrupted by our own shutdown: resumable
                status = None
            else:
                log.error("search %s failed:\n%s", search_id, traceback.format_exc())
                status, error = FAILED, f"{type(exc).__name__}: {exc}"
        finally:
            with self._held_lock:
                last = self._held.pop(search_id, None)
        with self.runtime.sessions() as session:
            if last == "lost":
                log.warning("search %s: another dispatcher took it over", search_id)
            elif status is None:  # shutting down: resumable
                crud.release_search(session, search_id=search_id, owner=self.owner)
                log.info("search %s: released for the next start", search_id)
            else:
                crud.finish_search(
                    session,
                    search_id=search_id,
                    owner=self.owner,
                    status=status,
                    error=error,
                    result_json=result,
                )
                log.info("search %s: %s", search_id, status)

    def _outcome(self, search_id: str, report: RunReport) -> str | None:
        """completed / cancelled / failed, or None when we stopped because the server is stopping."""
        with self._held_lock:
            held = self._held.get(search_id)
        if held == CANCELLING or self._cancelling(search_id):
            return CANCELLED
        if self._stop.is_set():
            return None
        if report.failing:
            raise RuntimeError(f"trials kept failing; last error: {report.last_error}")
        if report.outcome == "cancelled":
            return CANCELLED
        return COMPLETED  # "done", or "timeout" (the search's time budget ran out)

    def _cancelling(self, search_id: str) -> bool:
        """The row's status once more, when the run has ended (a cancel may have come since the
        watcher's last look)."""
        with self.runtime.sessions() as session:
            search = session.get(Search, search_id)
            return search is not None and search.status == CANCELLING

    # --- the watcher: leases and cancels ----------------------------------------------------------
    def _watch(self) -> None:
        """Every `dispatcher_poll_s`, read the status of the searches this process runs (the one
        poller of a cancel); every `lease_s / 3`, renew their leases instead (which reads it too)."""
        renew_every = self.settings.lease_s / 3
        last_renewal = time.monotonic()
        while not self._stop.wait(min(renew_every, self.settings.dispatcher_poll_s)):
            renew = time.monotonic() - last_renewal >= renew_every
            if renew:
                last_renewal = time.monotonic()
            with self._held_lock:
                held = list(self._held)
            for search_id in held:
                try:
                    with self.runtime.sessions() as session:
                        if renew:
                            status = crud.renew_lease(
                                session, search_id=search_id, owner=self.owner, lease_s=self.settings.lease_s
                            )
                        else:
                            status = crud.claimed_status(session, search_id=search_id, owner=self.owner)
                except Exception:
                    log.exception("search %s: cannot %s", search_id,
                                  "renew its lease" if renew else "read its status")
                    continue
                with self._held_lock:
                    if search_id in self._held:
                        self._held[search_id] = status or "lost"
