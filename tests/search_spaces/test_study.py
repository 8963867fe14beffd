"""Studies: SQLite storage, config identity, objectives, the Pareto front and the selection rule."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from search_spaces.config import ObjectiveConfig, SearchConfig
from search_spaces.storage import SQLITE_BUSY_TIMEOUT_S, open_storage
from search_spaces.study import (
    CONFIG_ATTR,
    create_study,
    describe_spec,
    load_study,
    mnas_score,
    objective_values,
    pareto_front,
    select_best,
    study_config,
    study_space,
    trial_counts,
)
from spsa_nas.config import TrainConfig


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/db/study.db"


def _add(study: optuna.Study, acc: float, lat: float, *, state: TrialState = TrialState.COMPLETE,
         values: list[float] | None = None) -> None:
    attrs: dict[str, Any] = {"val_acc": acc, "latency_ms": lat, "spec": {"backbone": "resnet18"}}
    if state == TrialState.COMPLETE and values is None:
        values = [acc, lat] if len(study.directions) == 2 else [acc]
    study.add_trial(optuna.trial.create_trial(state=state, values=values if state == TrialState.COMPLETE
                                              else None, user_attrs=attrs))


def test_sqlite_storage_is_wal_with_busy_timeout(url: str, tmp_path: Path) -> None:
    storage = open_storage(url)
    optuna.create_study(storage=storage, study_name="x")
    with sqlite3.connect(tmp_path / "db" / "study.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert storage.storage.engine.dialect.name == "sqlite"
    with storage.storage.engine.connect() as conn:
        # the one busy timeout of the storage factory (the trial lease is several times it)
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_S * 1000
    with pytest.raises(ValueError, match="not a database URL"):
        open_storage("not a url")


def test_create_study_stores_config_and_refuses_a_different_one(url: str) -> None:
    cfg = SearchConfig(study_name="s", space="quick", trials=4)
    study = create_study(cfg, url)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study_config(study) == cfg and study_space(study).name == "quick"
    # same settings, more trials: the same study is resumed
    again = create_study(cfg.model_copy(update={"trials": 10}), url)
    assert again._study_id == study._study_id
    assert study_config(load_study("s", url)).trials == 10
    changed = cfg.model_copy(update={"train": TrainConfig(epochs=7)})
    with pytest.raises(ValueError, match=r"different configuration \(train.epochs: 3 -> 7\)"):
        create_study(changed, url)
    other_space = cfg.model_copy(update={"space": "resnet18_cifar"})
    with pytest.raises(ValueError, match=r"different configuration.*space"):
        create_study(other_space, url)
    with pytest.raises(KeyError, match=r"no study .nope.*studies there: s"):
        load_study("nope", url)


def test_pruner_refused_for_pareto() -> None:
    with pytest.raises(ValueError, match=r"needs objective\.kind .score."):
        SearchConfig(pruner="median")
    cfg = SearchConfig(pruner="median", objective=ObjectiveConfig(kind="score", latency_target_ms=2))
    study = create_study(cfg, optuna.storages.InMemoryStorage())
    assert isinstance(study.pruner, optuna.pruners.MedianPruner)
    assert [d.name for d in study.directions] == ["MAXIMIZE"]


def test_objectives_and_mnas_score() -> None:
    pareto = SearchConfig()
    assert objective_values({"val_acc": 0.9, "latency": {"median_ms": 2.0}}, pareto) == [0.9, 2.0]
    soft = ObjectiveConfig(kind="score", latency_target_ms=2.0, weight=-0.5)
    assert mnas_score(0.8, 8.0, soft) == pytest.approx(0.8 * 4**-0.5)
    hard = ObjectiveConfig(kind="score", latency_target_ms=2.0, hard=True)
    assert mnas_score(0.8, 1.0, hard) == pytest.approx(0.8)
    assert mnas_score(0.8, 4.0, hard) == pytest.approx(0.4)
    score = SearchConfig(objective=soft)
    assert objective_values({"val_acc": 0.8, "latency_ms": 8.0}, score) == [pytest.approx(0.4)]
    with pytest.raises(ValueError, match="val_acc"):
        objective_values({"val_acc": None, "latency_ms": 1.0}, pareto)


def test_select_best_rule_on_a_sqlite_study(url: str) -> None:
    study = create_study(SearchConfig(study_name="sel"), url)
    _add(study, 0.90, 5.0)   # 0
    _add(study, 0.95, 9.0)   # 1: most accurate
    _add(study, 0.90, 3.0)   # 2: ties 0 on accuracy, faster
    _add(study, 0.80, 1.0)   # 3
    _add(study, 0.99, 0.5, state=TrialState.PRUNED)  # 4: not complete: never chosen
    _add(study, 0.70, 2.0)   # 5: dominated by 3? no: 3 is faster and more accurate -> dominated
    assert select_best(study).number == 1
    assert select_best(study, latency_budget_ms=6.0).number == 2  # tie on 0.90 -> lower latency
    assert select_best(study, latency_budget_ms=1.0).number == 3
    with pytest.raises(LookupError, match=r"no complete trial within 0\.1 ms"):
        select_best(study, latency_budget_ms=0.1)
    assert select_best(study, trial_number=0).number == 0
    with pytest.raises(LookupError, match="PRUNED"):
        select_best(study, trial_number=4)
    with pytest.raises(LookupError, match="no trial 99"):
        select_best(study, trial_number=99)
    assert [t.number for t in pareto_front(study)] == [3, 2, 1]
    assert trial_counts(study) == {"complete": 5, "pruned": 1, "fail": 0, "running": 0, "waiting": 0}


def test_select_best_uses_the_studys_budget_and_score(url: str) -> None:
    objective = ObjectiveConfig(kind="score", latency_target_ms=2.0, latency_budget_ms=4.0)
    study = create_study(SearchConfig(study_name="score", objective=objective), url)
    _add(study, 0.9, 3.0, values=[0.5])
    _add(study, 0.8, 1.0, values=[0.7])  # best score, not best accuracy
    _add(study, 0.99, 5.0, values=[0.9])  # over the study's budget
    assert study.user_attrs[CONFIG_ATTR]
    assert select_best(study).number == 1
    assert select_best(study, latency_budget_ms=10.0).number == 2


def test_describe_spec_names_nl_gc_and_spsa_switches() -> None:
    spec = {"backbone": "resnet18", "width": 0.25, "stages": [
        {"spsa": True, "spsa_heads": 2, "spsa_alpha": 0.5},
        {"spsa": True, "spsa_reverse": False, "spsa_similarity": "cosine", "channel_attn": "se"},
        {"spatial_attn": "nonlocal"}, {"spatial_attn": "gc", "channel_attn": "eca"}]}
    assert describe_spec(spec) == "resnet18 w0.25 s1:spsa2h/a0.5 s2:spsa1h/a1/fwd/cos+se s3:nl s4:gc+eca"


def test_the_default_sampler_is_grouped_multivariate_tpe() -> None:
    from search_spaces.study import make_sampler

    # auto = tpe (20-seed search-quality benchmark, docs/search.md); nsga2 stays available
    auto = make_sampler(SearchConfig(trials=40))
    assert isinstance(auto, optuna.samplers.TPESampler)
    assert auto._multivariate and auto._group and auto._constant_liar  # private: no public getters
    assert isinstance(make_sampler(SearchConfig(trials=40, sampler="nsga2")), optuna.samplers.NSGAIISampler)
    assert isinstance(make_sampler(SearchConfig(sampler="random")), optuna.samplers.RandomSampler)
