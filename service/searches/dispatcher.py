"""The dispatcher: threads that take queued searches from the database and run them on Ray.

A search is claimed with a lease (compare-and-set on its row) that a renewer thread extends while
it runs; a server that dies stops renewing, so after `lease_s` another (or the restarted) server
takes the search over and the runner resumes its study: finished trials are kept, none is run
twice. On shutdown the leases are given back at once, so a restart resumes without waiting.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from search_spaces.config import SearchConfig
from service import crud
from service.core.models import CANCELLED, CANCELLING, COMPLETED, FAILED, Search
from service.runtime import Runtime

log = logging.getLogger("spsa_nas.dispatcher")
CANCEL_ATTR = "spsa_nas:cancel"

# run_search(cfg, storage_url, *, artifact_dir, ray_address, should_cancel) -> summary dict
Runner = Callable[..., dict[str, Any]]


def ray_runner(trial_lease_s: float, trial_nice: int = 0) -> Runner:
    """workers.ray_runner.run_search with this service's trial lease and trial CPU niceness."""
    from functools import partial

    from workers.ray_runner import RunnerOptions, run_search

    return partial(run_search, options=RunnerOptions(lease_s=trial_lease_s, nice=trial_nice or None))


class Dispatcher:
    """`settings.concurrent_searches` threads running searches, plus one lease renewer."""

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
        renewer = threading.Thread(target=self._renew, name="spsa-nas-lease-renewer", daemon=True)
        renewer.start()
        self._threads.append(renewer)
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
                cfg = SearchConfig.model_validate_json(search.config)
                runner = self._runner or ray_runner(self.settings.trial_lease_s, self.settings.trial_nice)
                summary = runner(
                    cfg,
                    self.settings.db_url,
                    artifact_dir=str(self.settings.artifact_path),
                    ray_address=self.settings.ray_address,
                    should_cancel=lambda: self._should_cancel(search_id),
                )
                result = json.dumps(summary, default=str)
                status = self._outcome(search_id, summary)
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

    def _outcome(self, search_id: str, summary: dict[str, Any]) -> str | None:
        """completed / cancelled / failed, or None when we stopped because the server is stopping."""
        with self._held_lock:
            held = self._held.get(search_id)
        if held == CANCELLING or self._cancel_flag(search_id):
            return CANCELLED
        if self._stop.is_set():
            return None
        if summary.get("status") == "failed":
            last = summary.get("last_error") or self._last_trial_error(str(summary.get("study_name")))
            raise RuntimeError(f"trials kept failing; last error: {last}")
        return COMPLETED  # "completed", or "timeout" (the search's time budget ran out)

    def _last_trial_error(self, study_name: str) -> str | None:
        import optuna

        try:
            study = optuna.load_study(study_name=study_name, storage=self.runtime.storage)
        except KeyError:
            return None
        for trial in reversed(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))):
            if trial.user_attrs.get("error"):
                return str(trial.user_attrs["error"])
        return None

    def _cancel_flag(self, search_id: str) -> bool:
        with self.runtime.sessions() as session:
            search = session.get(Search, search_id)
            return search is not None and search.status == CANCELLING

    # --- leases ---------------------------------------------------------------------------------
    def _renew(self) -> None:
        interval = self.settings.lease_s / 3
        while not self._stop.wait(interval):
            with self._held_lock:
                held = list(self._held)
            for search_id in held:
                try:
                    with self.runtime.sessions() as session:
                        status = crud.renew_lease(
                            session, search_id=search_id, owner=self.owner, lease_s=self.settings.lease_s
                        )
                except Exception:
                    log.exception("search %s: cannot renew its lease", search_id)
                    continue
                with self._held_lock:
                    if search_id in self._held:
                        self._held[search_id] = status or "lost"
