"""The API's study snapshots: reloaded in the background after ttl_s (requests answer from the
previous one meanwhile), loaded at once when final and kept, reloaded by one thread at a time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna

from search_spaces.storage import open_storage
from service.searches.cache import StudyCache


class CountingStorage:
    """A real Optuna storage that counts the trial reloads made through it."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        self.storage = storage
        self.reloads = 0

    def get_all_trials(self, study_id: int, **kwargs: Any) -> list[optuna.trial.FrozenTrial]:
        self.reloads += 1
        return self.storage.get_all_trials(study_id, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


def _wait_for_reloads(storage: CountingStorage, count: int, cache: StudyCache) -> None:
    """Until the background reload has been made and has landed (it releases the reload lock)."""
    deadline = time.monotonic() + 30
    while storage.reloads < count or cache._reloading["s"].locked():
        assert time.monotonic() < deadline, f"no background reload ({storage.reloads} made)"
        time.sleep(0.005)


def _study(tmp_path: Path) -> CountingStorage:
    storage = open_storage(f"sqlite:///{tmp_path / 'cache.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    return CountingStorage(storage)


def test_snapshot_reloaded_after_ttl_and_kept_once_final(tmp_path: Path) -> None:
    storage = _study(tmp_path)
    cache = StudyCache(storage, ttl_s=3600)  # type: ignore[arg-type]
    assert cache.view("missing") is None
    first = cache.view("s")
    assert first is not None and len(first.trials) == 2
    assert cache.view("s") is first and storage.reloads == 1

    cache.ttl_s = 0  # expired at once: a view answers the previous snapshot and reloads behind it
    assert cache.view("s") is first
    _wait_for_reloads(storage, 2, cache)
    assert cache.view("s") is not first
    _wait_for_reloads(storage, 3, cache)  # (that view started the next background reload)
    final = cache.view("s", final=True)  # the end of the search: loaded at once, kept for good
    assert storage.reloads == 4
    assert cache.view("s") is final and storage.reloads == 4


def test_while_one_thread_reloads_the_others_answer_from_the_previous_snapshot(tmp_path: Path) -> None:
    storage = _study(tmp_path)
    cache = StudyCache(storage, ttl_s=0)  # type: ignore[arg-type]
    previous = cache.view("s")
    assert previous is not None and storage.reloads == 1
    reloading = cache._reloading["s"]
    assert reloading.acquire(blocking=False)  # as if another request were reloading right now
    try:
        assert cache.view("s") is previous and storage.reloads == 1  # no second reload meanwhile
    finally:
        reloading.release()
    assert cache.view("s") is previous  # stale: answered at once, reloaded behind it
    _wait_for_reloads(storage, 2, cache)
    assert cache.view("s") is not previous
