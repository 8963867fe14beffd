"""The study's metric names: what optuna-dashboard writes on the Pareto front's and the history's axes."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from search_spaces.config import ObjectiveConfig, SearchConfig
from search_spaces.study import METRIC_NAMES, create_study

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.mark.parametrize(
    ("objective", "names"),
    [(ObjectiveConfig(), ["validation accuracy", "latency (ms)"]),
     (ObjectiveConfig(kind="score", latency_target_ms=2.0), ["score"])],
)
def test_create_study_names_the_objectives(objective: ObjectiveConfig, names: list[str],
                                           tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    cfg = SearchConfig(study_name="s", objective=objective, trials=2)
    study = create_study(cfg, url)
    assert study.metric_names == names == METRIC_NAMES[objective.kind]
    assert len(names) == len(study.directions)
    # stored with the study: any reader (the dashboard) sees them, also after a resume
    create_study(cfg.model_copy(update={"trials": 3}), url)
    assert optuna.load_study(study_name="s", storage=url).metric_names == names
