"""The Ray runner ends a search by re-training its top-k with more seeds (config `reseed`) as Ray tasks,
recorded like the local runner's (SEEDS_ATTR); failures, a cancel and the timeout are recorded and
never fail the search. A real local Ray, tiny models."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from search_spaces.config import Resources, SearchConfig
from search_spaces.keys import LATENCY_CI_ATTR, PHASE_ATTR, SEEDS_ATTR
from search_spaces.storage import open_storage
from search_spaces.study import create_study
from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig
from tests.workers.test_ray_runner import FAST, TINY_SPACE
from workers.ray_runner import run_search

pytestmark = [pytest.mark.ray]

OPTIONS = dataclasses.replace(FAST, remeasure_finalists=False)  # the re-measurement has its own tests
SPEC = {"backbone": "resnet18", "num_classes": 10, "in_channels": 1, "stem": "cifar", "input_size": 16,
        "width": 0.25, "stages": [{}, {}, {}, {}]}
TINY: dict[str, Any] = {"sampler": "random", "parallelism": 2, "resources": Resources(num_cpus=1),
                        "device": "cpu", "dataset": DataConfig(name="digits", train_subset=96),
                        "train": TrainConfig(epochs=1, batch_size=16),
                        "latency": LatencyConfig(warmup=1, repeats=3, blocks=4, max_time_s=0.3,
                                                 max_warmup_s=0.2)}


def _load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url))


def _filled(url: str, name: str, specs: list[dict[str, Any]], **cfg: Any) -> optuna.Study:
    """A study whose `trials` complete trials are there already: a run goes straight to its end."""
    study = create_study(SearchConfig(study_name=name, trials=len(specs), **{**TINY, **cfg}), url)
    for number, spec in enumerate(specs):
        acc = 0.9 - 0.1 * number
        attrs = {"val_acc": acc, "latency_ms": 2.0, LATENCY_CI_ATTR: [1.9, 2.1], "spec": spec}
        study.add_trial(optuna.trial.create_trial(values=[acc, 2.0], user_attrs=attrs))
    return study


@pytest.mark.slow
def test_a_ray_search_ends_with_its_top_k_retrained(ray_local: None, sqlite_url: str, tmp_path: Path) -> None:
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    create_study(SearchConfig(study_name="rr", space=str(space), trials=2, reseed={"top_k": 1, "seeds": 2},
                              **TINY), sqlite_url)
    report = run_search("rr", sqlite_url, artifact_dir=tmp_path / "a", options=OPTIONS)
    assert report.outcome == "done" and report.counts["fail"] == 0, report
    study = _load(sqlite_url, "rr")
    assert len(study.trials) == 2  # the re-training adds no trial
    record = study.user_attrs[SEEDS_ATTR]
    assert record["stopped"] is None and record["error"] is None, record
    best = max((t for t in study.trials if t.state == TrialState.COMPLETE),
               key=lambda t: (t.user_attrs["val_acc"], -t.user_attrs["latency_ms"], -t.number))
    assert record["planned"] == [best.number] and list(record["trials"]) == [str(best.number)]
    entry = record["trials"][str(best.number)]
    assert entry["seeds"] == 2 and entry["val_acc_by_seed"]["0"] == best.user_attrs["val_acc"]
    assert 0.0 <= entry["val_acc_by_seed"]["1"] <= 1.0
    assert study.user_attrs.get(PHASE_ATTR) is None  # "reseed" while it ran, then as it was


def test_a_failed_retraining_is_recorded_and_the_search_is_done(ray_local: None, sqlite_url: str,
                                                               tmp_path: Path) -> None:
    bad = {**SPEC, "backbone": "no-such-backbone"}
    _filled(sqlite_url, "bad", [bad, SPEC], reseed={"top_k": 1, "seeds": 3})
    report = run_search("bad", sqlite_url, artifact_dir=tmp_path, options=OPTIONS)
    assert report.outcome == "done", report
    record = _load(sqlite_url, "bad").user_attrs[SEEDS_ATTR]
    assert record["planned"] == [0] and record["trials"] == {} and record["stopped"] is None
    assert "trial 0 seed 1" in record["error"] and "trial 0 seed 2" in record["error"]  # each task's
    assert "no-such-backbone" in record["error"]


def test_a_cancel_stops_the_retraining(ray_local: None, sqlite_url: str, tmp_path: Path) -> None:
    _filled(sqlite_url, "cancel", [SPEC], reseed={"top_k": 1, "seeds": 3})
    polls: list[str | None] = []

    def should_cancel() -> bool:  # once the re-training's tasks are in flight (its second poll)
        polls.append(_load(sqlite_url, "cancel").user_attrs.get(PHASE_ATTR))
        return polls.count("reseed") >= 2

    report = run_search("cancel", sqlite_url, artifact_dir=tmp_path, options=OPTIONS,
                        should_cancel=should_cancel)
    assert report.outcome == "done", report  # the trials were done: the search's outcome stands
    study = _load(sqlite_url, "cancel")
    record = study.user_attrs[SEEDS_ATTR]
    assert record["stopped"] == "cancelled" and record["error"] is None and record["planned"] == [0]
    assert study.user_attrs.get(PHASE_ATTR) is None


def test_the_retraining_keeps_within_the_search_timeout(ray_local: None, sqlite_url: str,
                                                       tmp_path: Path) -> None:
    _filled(sqlite_url, "late", [SPEC], reseed={"top_k": 1, "seeds": 2}, timeout_s=0.001)
    report = run_search("late", sqlite_url, artifact_dir=tmp_path, options=OPTIONS)
    assert report.outcome == "done", report
    record = _load(sqlite_url, "late").user_attrs[SEEDS_ATTR]
    assert record["stopped"] == "timeout" and record["trials"] == {}, record
