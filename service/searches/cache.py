"""Snapshots of a search's study, cached: ids and configs for good, trials for a few seconds (or for
good once the search has ended), reloaded by one thread at a time."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Container
from typing import Any

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from search_spaces.keys import CONFIG_ATTR

log = logging.getLogger("spsa_nas.service")

class StudyView:
    """A read-only snapshot of a study: what search_spaces.study's pareto_front and select_best
    read (study_name, user_attrs, get_trials), loaded once per request or reused from the cache."""

    def __init__(
        self, study_name: str, study_id: int, user_attrs: dict[str, Any], trials: list[FrozenTrial]
    ) -> None:
        self.study_name = study_name
        self._study_id = study_id
        self.user_attrs = user_attrs
        self._trials = trials

    @property
    def trials(self) -> list[FrozenTrial]:
        return self._trials

    def get_trials(
        self, deepcopy: bool = False, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        if states is None:
            return list(self._trials)
        return [t for t in self._trials if t.state in states]


class StudyCache:
    """Study ids (they never change) and study snapshots for `ttl_s` seconds, or for good once
    the search has ended: under load, repeated reads of a running search cost one storage read
    per `ttl_s`, not one per request."""

    def __init__(self, storage: BaseStorage, ttl_s: float) -> None:
        self.storage = storage
        self.ttl_s = ttl_s
        self._ids: dict[str, int] = {}
        self._configs: dict[str, dict[str, Any]] = {}
        self._views: dict[str, tuple[float, bool, StudyView]] = {}
        self._reloading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def study_id(self, study_name: str) -> int | None:
        if study_name in self._ids:
            return self._ids[study_name]
        try:
            study_id = self.storage.get_study_id_from_name(study_name)
        except KeyError:
            return None
        with self._lock:
            self._ids[study_name] = study_id
        return study_id

    def config(self, study_name: str) -> dict[str, Any] | None:
        """The search's config as its study stores it (the one copy, user attr CONFIG_ATTR), as
        JSON data; None when the study is gone. Cached for good: the service never changes it."""
        if study_name in self._configs:
            return self._configs[study_name]
        study_id = self.study_id(study_name)
        if study_id is None:
            return None
        stored = self.storage.get_study_user_attrs(study_id).get(CONFIG_ATTR)
        if stored is None:
            return None
        config = json.loads(stored) if isinstance(stored, str) else dict(stored)
        with self._lock:
            if len(self._configs) >= 4096:  # keep the most recent
                for name in list(self._configs)[:1024]:
                    del self._configs[name]
            self._configs[study_name] = config
        return config

    def view(self, study_name: str, *, final: bool = False) -> StudyView | None:
        """The study's snapshot (None when it does not exist); `final`: the search has ended.

        A fresh snapshot is answered as it is. A stale one is answered too, while one background
        thread reloads it (stale-while-revalidate: no request waits for a reload, so a reload's
        cost never shows in the API's tail latency; a snapshot is at most ttl_s plus one reload
        old). A request waits only when nothing is cached yet, or when it asks for the final
        state of a search whose cached snapshot predates its end (once per search).
        """
        cached = self._fresh(study_name)
        if cached is not None and cached[0]:
            return cached[1]
        with self._lock:
            reloading = self._reloading.setdefault(study_name, threading.Lock())
        if cached is not None and not final:
            if reloading.acquire(blocking=False):
                threading.Thread(
                    target=self._reload_in_background,
                    args=(study_name, reloading),
                    name="spsa-nas-study-reload",
                    daemon=True,
                ).start()
            return cached[1]
        with reloading:
            again = self._fresh(study_name)  # another thread may have reloaded it meanwhile
            if again is not None and again[0]:
                return again[1]
            return self._load(study_name, final)

    def _reload_in_background(self, study_name: str, reloading: threading.Lock) -> None:
        try:
            self._load(study_name, False)
        except Exception:  # the next request tries again; the stale snapshot is still answered
            log.exception("cannot reload the study %s", study_name)
        finally:
            reloading.release()

    def _fresh(self, study_name: str) -> tuple[bool, StudyView] | None:
        """(still fresh?, the cached snapshot), or None when nothing is cached."""
        cached = self._views.get(study_name)
        if cached is None:
            return None
        return cached[1] or time.monotonic() - cached[0] < self.ttl_s, cached[2]

    def _load(self, study_name: str, final: bool) -> StudyView | None:
        now = time.monotonic()
        study_id = self.study_id(study_name)
        if study_id is None:
            return None
        view = StudyView(
            study_name,
            study_id,
            self.storage.get_study_user_attrs(study_id),
            self.storage.get_all_trials(study_id, deepcopy=False),
        )
        with self._lock:
            self._views[study_name] = (now, final, view)
            if len(self._views) > 1024:  # keep the most recent
                for name in sorted(self._views, key=lambda n: self._views[n][0])[:256]:
                    del self._views[name]
                    self._reloading.pop(name, None)
        return view

    def forget(self, study_name: str) -> None:
        with self._lock:
            self._views.pop(study_name, None)
