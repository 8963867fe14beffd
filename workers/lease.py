"""Trial leases of the Ray runner: the owner's heartbeat thread and the coordinator's stale check."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from search_spaces.keys import HEARTBEAT_ATTR

logger = logging.getLogger(__name__)


class Heartbeat:
    """The owner's side of a trial lease: a daemon thread that refreshes the trial's heartbeat.

    Every `interval_s` it writes HEARTBEAT_ATTR, reads the study user attr `cancel_key` (the
    coordinator's cancel flag of this run, search_spaces.keys.run_cancel_attr) and checks that the
    trial is still RUNNING (the coordinator fails a trial whose lease expired; the owner must then
    stop, since its result would no longer be accepted). `stop_reason` says why to stop, if so.
    """

    def __init__(
        self,
        storage: BaseStorage,
        study_id: int,
        trial_id: int,
        interval_s: float,
        *,
        cancel_key: str | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"heartbeat interval must be > 0 seconds, got {interval_s}")
        self._storage = storage
        self._study_id = study_id
        self._trial_id = trial_id
        self._interval_s = interval_s
        self._cancel_key = cancel_key
        self._done = threading.Event()
        self._seq = 0
        self.stop_reason: str | None = None  # "cancelled" or "lease lost"
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)

    def beat(self) -> None:
        """Refresh the lease once and look at the cancel flag and at the trial's state."""
        self._seq += 1
        self._storage.set_trial_user_attr(
            self._trial_id, HEARTBEAT_ATTR, {"seq": self._seq, "time": time.time()}
        )
        if self._cancel_key is not None:
            attrs = self._storage.get_study_user_attrs(self._study_id)
            if attrs.get(self._cancel_key) is True:
                self.stop_reason = self.stop_reason or "cancelled"

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._done.wait(self._interval_s):
            try:
                self.beat()
            except optuna.exceptions.UpdateFinishedTrialError:
                # Someone else finished our trial: the coordinator declared it lost.
                self.stop_reason = self.stop_reason or "lease lost"
                return
            except Exception as error:  # keep beating; the lease tolerates missed beats
                logger.warning("heartbeat of trial %d failed: %s", self._trial_id, error)

    def close(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval_s + 30)


@dataclass
class LeaseTracker:
    """The coordinator's side: which RUNNING trials have not refreshed their heartbeat for a lease.

    It compares heartbeat *values* seen over time on the coordinator's own clock, so clocks of the
    workers do not matter. A trial with no heartbeat at all counts from when it was first seen. A
    freshly started coordinator therefore waits one full lease before it fails anything.
    """

    lease_s: float
    _seen: dict[int, tuple[Any, float]] = field(default_factory=dict)

    def stale(self, running: Sequence[FrozenTrial], now: float | None = None) -> list[FrozenTrial]:
        now = time.monotonic() if now is None else now
        expired = []
        alive: set[int] = set()
        for trial in running:
            alive.add(trial._trial_id)
            beat = trial.user_attrs.get(HEARTBEAT_ATTR)
            key = (beat or {}).get("seq") if isinstance(beat, dict) else beat
            previous = self._seen.get(trial._trial_id)
            if previous is None or previous[0] != key:
                self._seen[trial._trial_id] = (key, now)
            elif now - previous[1] > self.lease_s:
                expired.append(trial)
        for trial_id in list(self._seen):
            if trial_id not in alive:
                del self._seen[trial_id]
        return expired

    def forget(self, trial_id: int) -> None:
        self._seen.pop(trial_id, None)
