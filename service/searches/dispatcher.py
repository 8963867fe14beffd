"""The dispatcher: threads that take queued searches from the database and run them on Ray.

A search is claimed with a lease (compare-and-set on its row) that a watcher thread extends while
it runs; a server that dies stops renewing, so after `lease_s` another (or the restarted) server
takes the search over and the runner resumes its study: finished trials are kept, none is run
twice. On shutdown the leases are given back at once, so a restart resumes without waiting.

Cancellation is one fact, the row's status `cancelling` (set by the API), and the watcher is its
one poller: it reads the status of the searches it runs every `dispatcher_poll_s` and tells the
runner through `should_cancel`; the runner's coordinator tells its own workers.

It runs in the coordinator process (`spsa-nas coordinator`, service/cli/coordinator.py), never in
the API's. The database may go away under it: a failed claim, renewal or end of a search is logged
and retried, never the end of a thread. When the lease of a search could not be renewed for
`lease_s` (the storage is down longer than that) the run is stopped (its tasks cancelled) and the
search released for resumption, not failed: another coordinator may already have taken it over.
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
from typing import Any

from search_spaces.run import RunReport
from service import crud
from service.core.models import CANCELLED, CANCELLING, COMPLETED, FAILED, Search
from service.core.settings import Settings
from service.runtime import Runtime

log = logging.getLogger("spsa_nas.dispatcher")

LOST = "lost"  # held status: another dispatcher holds the search now
OUTAGE = "outage"  # held status: the lease could not be renewed for lease_s (database unreachable)
WORK_THREAD = "spsa-nas-dispatcher-"  # + index: the threads that run searches
RECORD_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # between tries of recording a search's end

# run_search(study_name, storage_url, *, artifact_dir, ray_address, should_cancel) -> RunReport
Runner = Callable[..., RunReport]
# remeasure_on_ray(study_name, storage_url, *, should_stop) -> the finalists' record, or None
Remeasurer = Callable[..., dict[str, Any] | None]


def _runner_options(settings: Settings) -> Any:
    from workers.ray_runner import RunnerOptions

    memory = int(settings.trial_memory_gb * 2**30) if settings.trial_memory_gb else None
    return RunnerOptions(
        lease_s=settings.trial_lease_s,
        nice=settings.trial_nice or None,
        memory_bytes=memory,
        pending_timeout_s=settings.trial_pending_timeout_s,
    )


def ray_runner(settings: Settings) -> Runner:
    """workers.ray_runner.run_search with this service's trial lease, CPU niceness, per-trial memory
    bound (when a search sets none) and the time a trial may wait for resources."""
    from functools import partial

    from workers.ray_runner import run_search

    return partial(run_search, options=_runner_options(settings))


def ray_remeasurer(settings: Settings) -> Remeasurer:
    """workers.finalists.remeasure_on_ray with this service's per-trial memory bound: the on-demand
    re-measurement of a finished search's finalists, the same as a run's end does."""
    from functools import partial

    from workers.finalists import remeasure_on_ray

    return partial(remeasure_on_ray, options=_runner_options(settings), poll_s=settings.dispatcher_poll_s)


class Dispatcher:
    """`settings.concurrent_searches` threads running searches, plus one watcher of their rows."""

    def __init__(
        self, runtime: Runtime, *, runner: Runner | None = None, remeasurer: Remeasurer | None = None
    ) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.owner = f"spsa-nas-{uuid.uuid4()}"  # this process's claims
        self._runner = runner
        self._remeasurer = remeasurer
        self._stop = threading.Event()
        self._draining = threading.Event()  # claim nothing more; let the running searches finish
        self._held: dict[str, str] = {}  # search id -> last known status, LOST or OUTAGE
        self._tokens: dict[str, int] = {}  # search id -> the fencing token of our claim
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
            self._publish_resources()
        for i in range(self.settings.concurrent_searches):
            thread = threading.Thread(target=self._work, name=f"{WORK_THREAD}{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        watcher = threading.Thread(target=self._watch, name="spsa-nas-search-watcher", daemon=True)
        watcher.start()
        self._threads.append(watcher)
        log.info("dispatcher %s: %d concurrent searches", self.owner, self.settings.concurrent_searches)

    def drain(self) -> None:
        """Take no new search; the running ones go on to their end (the API that started this
        coordinator is gone: its searches finish, a new coordinator takes the queue)."""
        self._draining.set()

    def idle(self) -> bool:
        """After drain(): whether every search thread has ended (the coordinator may exit)."""
        return self._draining.is_set() and not any(
            t.is_alive() for t in self._threads if t.name.startswith(WORK_THREAD)
        )

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop taking work, ask running searches to stop, give their leases back."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s  # one deadline for all: the threads stop together
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._started_ray:
            try:
                with self.runtime.sessions() as session:
                    crud.forget_coordinator(session, owner=self.owner)
            except Exception:
                log.exception("dispatcher: cannot withdraw its cluster report (it goes stale by itself)")
        if self._started_ray:
            import ray

            ray.shutdown()

    # --- the work loop ------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set() and not self._draining.is_set():
            if self._disk_full() is not None:  # start nothing while the disk is full
                self._stop.wait(self.settings.dispatcher_poll_s)
                continue
            if self._remeasure_next():  # asked-for re-measurements first: short, and their users wait
                continue
            try:
                with self.runtime.sessions() as session:
                    search = crud.claim_next_search(
                        session,
                        owner=self.owner,
                        lease_s=self.settings.lease_s,
                        max_running_per_user=self.settings.max_running_searches_per_user,
                    )
            except Exception:
                log.exception("dispatcher: cannot claim a search (database unreachable?)")
                search = None
            if search is None:
                self._stop.wait(self.settings.dispatcher_poll_s)
                continue
            try:
                self._run(search)
            except Exception:  # never the silent end of a dispatcher thread
                log.exception("search %s: the dispatcher could not run it; its lease will expire", search.id)

    # --- on-demand re-measurements of finished searches' finalists ------------------------------
    def _remeasure_next(self) -> bool:
        """Claim and run one pending re-measurement (POST .../remeasure); False when none is pending."""
        try:
            with self.runtime.sessions() as session:
                search = crud.claim_remeasure(session, owner=self.owner, lease_s=self.settings.lease_s)
        except Exception:
            log.exception("dispatcher: cannot claim a re-measurement (database unreachable?)")
            return False
        if search is None:
            return False
        try:
            self._remeasure(search)
        except Exception:  # never the silent end of a dispatcher thread; the claim expires
            log.exception("search %s: the dispatcher could not re-measure its finalists", search.id)
        return True

    def _remeasure(self, search: Search) -> None:
        """Run the finalists' re-measurement of `search` (the same as at the end of a run), renewing
        the claim every lease_s / 3 while it runs; then clear the request and record when it finished
        (and its error). Stopped by our shutdown, or with the claim lost: released, still pending."""
        search_id, lease_s = search.id, self.settings.lease_s
        renewed, lost = time.monotonic(), False

        def should_stop() -> bool:
            nonlocal renewed, lost
            if self._stop.is_set() or lost:
                return True
            if time.monotonic() - renewed >= lease_s / 3:
                try:
                    with self.runtime.sessions() as session:
                        ours = crud.renew_remeasure(
                            session, search_id=search_id, owner=self.owner, lease_s=lease_s
                        )
                except Exception:
                    log.exception("search %s: cannot renew its re-measurement's claim", search_id)
                    ours = time.monotonic() - renewed < lease_s
                    if ours:
                        return False
                if ours:
                    renewed = time.monotonic()
                else:
                    lost = True
            return lost

        log.info("search %s: re-measuring its finalists (asked %s)", search_id, search.remeasure_requested_at)
        error = None
        try:
            remeasurer = self._remeasurer or ray_remeasurer(self.settings)
            record = remeasurer(search.study_name, self.settings.db_url, should_stop=should_stop)
            if record is None and not should_stop():
                error = "the search has no complete trial with a spec: nothing to re-measure"
            elif record is not None and record.get("error"):
                error = str(record["error"])
        except Exception as exc:
            log.warning("search %s: the re-measurement failed:\n%s", search_id, traceback.format_exc())
            error = f"{type(exc).__name__}: {exc}"[-2000:]
        with self.runtime.sessions() as session:
            if self._stop.is_set() or lost:
                crud.release_remeasure(session, search_id=search_id, owner=self.owner)
                log.info("search %s: re-measurement released unfinished (still pending)", search_id)
                return
            done = crud.finish_remeasure(session, search_id=search_id, owner=self.owner, error=error)
        log.info("search %s: re-measurement %s", search_id,
                 ("failed: " + error if error else "done") if done else "taken over meanwhile")

    def _should_cancel(self, search_id: str) -> bool:
        if self._stop.is_set():
            return True
        with self._held_lock:
            return self._held.get(search_id) in (CANCELLING, LOST, OUTAGE)

    def _run(self, search: Search) -> None:
        search_id = search.id
        with self._held_lock:
            self._held[search_id] = search.status
            self._tokens[search_id] = search.lease_token
        log.info("search %s: running (attempt %d)", search_id, search.attempts)
        status: str | None = COMPLETED
        error, result = None, None
        try:
            if search.status == CANCELLING:
                status = CANCELLED
            else:
                runner = self._runner or ray_runner(self.settings)
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
            with self._held_lock:
                held = self._held.get(search_id)
            if self._stop.is_set() or held == OUTAGE or _is_database_error(exc):
                # our own shutdown, or the storage went away under the run: resumable, not failed
                log.warning(
                    "search %s: stopped (%s: %s); released for resumption", search_id, type(exc).__name__, exc
                )
                status = None
            else:
                log.error("search %s failed:\n%s", search_id, traceback.format_exc())
                status, error = FAILED, f"{type(exc).__name__}: {exc}"
        finally:
            with self._held_lock:
                last = self._held.pop(search_id, None)
        if last == LOST:
            log.warning("search %s: another dispatcher took it over", search_id)
            return
        token = self._tokens.pop(search_id, None)
        if self._record(search_id, token, status, error, result) and status is not None:
            self._prune(search)
            if status == COMPLETED:
                self._attach_attention_map(search)

    def _attach_attention_map(self, search: Search) -> None:
        """The best model's SPSA attention maps on a validation image, stored with the finished
        study so optuna-dashboard shows them; a failure is logged, the search's end is recorded."""
        import optuna

        from workers.maps_job import attach_best_map

        try:
            study = optuna.load_study(study_name=search.study_name, storage=self.runtime.storage)
            record = attach_best_map(study, self.runtime.artifact_store)
        except Exception:
            log.exception("search %s: cannot draw its best model's attention maps", search.id)
            return
        if record is not None:
            log.info("search %s: attention maps of trial %d stored", search.id, record["trial"])

    def _prune(self, search: Search) -> None:
        """Keep only the weights the settings say (the Pareto front, top-k or all) of a search
        that ended; a failure here is logged, the search's end is already recorded."""
        from service.searches.retention import prune_search

        try:
            pruned = prune_search(self.runtime.storage, search.study_name, self.settings)
        except Exception:
            log.exception("search %s: cannot prune its artifacts", search.id)
            return
        if pruned.pruned:
            log.info("search %s: pruned weights of %d trials", search.id, len(pruned.pruned))

    def _record(
        self, search_id: str, token: int | None, status: str | None, error: str | None, result: str | None
    ) -> bool:
        """Write the end of a run (finish, or release when `status` is None), retrying database
        errors with backoff until it lands or this dispatcher stops; on giving up the lease
        expires and the next coordinator resumes the search (a finished study ends at once).
        Written under our claim's fencing token: after a takeover it changes nothing. True when the
        end was recorded by us."""
        for attempt in range(10_000):
            try:
                with self.runtime.sessions() as session:
                    if status is None:
                        done = crud.release_search(
                            session, search_id=search_id, owner=self.owner, token=token
                        )
                        log.info("search %s: released for the next start", search_id)
                    else:
                        done = crud.finish_search(
                            session,
                            search_id=search_id,
                            owner=self.owner,
                            status=status,
                            error=error,
                            result_json=result,
                            token=token,
                        )
                        log.info("search %s: %s", search_id, status if done else "taken over meanwhile")
                return bool(done)
            except Exception:
                what = "release" if status is None else f"record the end ({status}) of"
                log.exception("search %s: cannot %s it (try %d); retrying", search_id, what, attempt + 1)
            if self._stop.wait(RECORD_BACKOFF_S[min(attempt, len(RECORD_BACKOFF_S) - 1)]):
                log.error(
                    "search %s: stopping before its end was recorded; its lease will expire and the "
                    "next coordinator resumes it",
                    search_id,
                )
                return False
        return False

    def _outcome(self, search_id: str, report: RunReport) -> str | None:
        """completed / cancelled / failed, or None when we stopped it (shutdown, storage outage)."""
        with self._held_lock:
            held = self._held.get(search_id)
        if held == CANCELLING or self._cancelling(search_id):
            return CANCELLED
        if self._stop.is_set() or held == OUTAGE:  # stopped by us, or the lease lapsed: resumable
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

    def _disk_full(self) -> str | None:
        from service.searches.retention import low_disk

        try:
            return low_disk(self.settings)
        except OSError:  # a directory gone: the runs' own writes will tell
            return None

    def _stop_runs_if_the_disk_is_full(self) -> None:
        """Under `min_free_disk_bytes` free, stop every run here cleanly and release its search for
        resumption (trials stopped at a step boundary, not a database written to a full disk)."""
        message = self._disk_full()
        if message is None:
            return
        with self._held_lock:
            running = [search_id for search_id, status in self._held.items() if status != OUTAGE]
            for search_id in running:
                self._held[search_id] = OUTAGE
        for search_id in running:
            log.error("search %s: stopped, to be resumed: %s", search_id, message)

    def _publish_resources(self) -> None:
        """Tell the API what the Ray cluster has in all (it checks submissions against it without
        importing Ray); refreshed at every lease renewal, so a dead coordinator's report goes stale."""
        if not self._started_ray:
            return
        import ray

        try:
            totals = {k: float(v) for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
            with self.runtime.sessions() as session:
                crud.publish_resources(session, owner=self.owner, resources=totals)
        except Exception:
            log.exception("dispatcher: cannot publish the cluster's resources")

    # --- the watcher: leases and cancels ----------------------------------------------------------
    def _watch(self) -> None:
        """Every `dispatcher_poll_s`, read the status of the searches this process runs (the one
        poller of a cancel); every `lease_s / 3`, renew their leases instead (which reads it too)."""
        renew_every = self.settings.lease_s / 3
        last_renewal = time.monotonic()
        renewed: dict[str, float] = {}  # search id -> when its lease was last renewed (or claimed)
        while not self._stop.wait(min(renew_every, self.settings.dispatcher_poll_s)):
            renew = time.monotonic() - last_renewal >= renew_every
            if renew:
                last_renewal = time.monotonic()
                self._publish_resources()
            self._stop_runs_if_the_disk_is_full()  # one statvfs per poll
            with self._held_lock:
                held = list(self._held)
            for gone in set(renewed) - set(held):
                del renewed[gone]
            for search_id in held:
                renewed.setdefault(search_id, time.monotonic())
                try:
                    with self.runtime.sessions() as session:
                        if renew:
                            status = crud.renew_lease(
                                session,
                                search_id=search_id,
                                owner=self.owner,
                                lease_s=self.settings.lease_s,
                                token=self._tokens.get(search_id),
                            )
                        else:
                            token = self._tokens.get(search_id)
                            status = crud.claimed_status(
                                session, search_id=search_id, owner=self.owner, token=token
                            )
                except Exception:
                    log.exception(
                        "search %s: cannot %s", search_id, "renew its lease" if renew else "read its status"
                    )
                    if time.monotonic() - renewed[search_id] >= self.settings.lease_s:
                        log.error(
                            "search %s: lease not renewed for %g s (database unreachable): stopping "
                            "its run, to be resumed",
                            search_id,
                            self.settings.lease_s,
                        )
                        with self._held_lock:
                            if search_id in self._held:
                                self._held[search_id] = OUTAGE
                    continue
                if renew:
                    renewed[search_id] = time.monotonic()
                with self._held_lock:
                    if search_id in self._held and self._held[search_id] != OUTAGE:
                        self._held[search_id] = status or LOST


def _is_database_error(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) comes from the database driver or Optuna's storage: an
    outage to wait out, not a reason to fail the search."""
    import optuna
    from sqlalchemy.exc import DBAPIError, OperationalError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (OperationalError, DBAPIError, optuna.exceptions.StorageInternalError)):
            return True
        current = current.__cause__ or current.__context__
    return False
