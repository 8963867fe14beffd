"""service.searches.retention: a finished search keeps the weights of its Pareto front (or top-k) only;
real Optuna storage and real artifact files, SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import optuna

from service.core.paths import artifact_file
from service.searches.retention import (
    ARTIFACT_ATTRS,
    artifact_bytes,
    prune_artifacts,
    pruned_trials,
)
from tests.service.conftest import Service

# (val_acc, latency_ms): 0 and 1 are the Pareto front, 2 and 3 are dominated by 0
RESULTS: list[tuple[float, float] | str] = [(0.9, 5.0), (0.5, 1.0), (0.4, 6.0), (0.3, 10.0), "fail"]


def _files(service: Service, study: optuna.Study) -> dict[int, list[Path]]:
    """The artifact files each complete trial names, as they are on disk now."""
    root = service.settings.artifact_path
    return {
        t.number: [p for a in ARTIFACT_ATTRS if (p := artifact_file(root, t.user_attrs.get(a))) is not None]
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    }


def test_only_the_pareto_fronts_weights_stay(service: Service) -> None:
    alice = service.user()
    search = service.submit(alice, trials=5)
    study = service.fill(search, RESULTS)
    before = _files(service, study)
    assert all(before[n] for n in range(4))  # every complete trial has its weights at first
    names = [search["study_name"]]
    used = artifact_bytes(service.runtime.storage, names, artifact_dir=service.settings.artifact_path)
    dominated_bytes = sum(p.stat().st_size for n in (2, 3) for p in before[n])

    result = prune_artifacts(
        service.runtime.storage, search["study_name"], artifact_dir=service.settings.artifact_path
    )
    assert (result.kept, result.pruned) == ([0, 1], [2, 3])
    assert result.freed_bytes == dominated_bytes
    assert all(p.is_file() for n in (0, 1) for p in before[n])
    assert not any(p.exists() for n in (2, 3) for p in before[n])
    after = artifact_bytes(service.runtime.storage, names, artifact_dir=service.settings.artifact_path)
    assert after == used - result.freed_bytes > 0

    assert pruned_trials(service.runtime.storage, search["study_name"]) == {2, 3}
    headers = alice
    kept = service.client.get(f"/api/v1/searches/{search['id']}/best/weights?trial=0", headers=headers)
    gone = service.client.get(f"/api/v1/searches/{search['id']}/best/weights?trial=2", headers=headers)
    assert kept.status_code == 200 and gone.status_code == 404

    again = prune_artifacts(
        service.runtime.storage, search["study_name"], artifact_dir=service.settings.artifact_path
    )
    assert again.freed_bytes == 0 and again.kept == [0, 1]


def test_top_k_keeps_the_best_by_accuracy_and_all_keeps_everything(service: Service) -> None:
    alice = service.user()
    search = service.submit(alice, trials=5)
    study = service.fill(search, RESULTS)
    before = _files(service, study)
    root = service.settings.artifact_path

    everything = prune_artifacts(service.runtime.storage, search["study_name"], artifact_dir=root, keep="all")
    assert everything.pruned == [] and all(p.is_file() for files in before.values() for p in files)

    top = prune_artifacts(
        service.runtime.storage, search["study_name"], artifact_dir=root, keep="top_k", top_k=1
    )
    assert (top.kept, top.pruned) == ([0], [1, 2, 3])
    assert all(p.is_file() for p in before[0])
    assert not any(p.exists() for n in (1, 2, 3) for p in before[n])
    assert pruned_trials(service.runtime.storage, search["study_name"]) == {1, 2, 3}
