"""What ranks one-shot candidates: exp(-validation loss) under oneshot.estimate "loss" (the default),
the top-1 estimate under "accuracy" - in the objective, the Pareto front, best, its ties, the
finalists re-measured and those retrained."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from search_spaces.config import OneshotConfig, SearchConfig
from search_spaces.finalists import decide_best, finalist_trials
from search_spaces.keys import ESTIMATE_ATTR, ONESHOT_SCORE_ATTR
from search_spaces.study import objective_values, oneshot_score, pareto_front, ranked_accuracy, select_best
from spsa_nas.config import DataConfig
from workers.oneshot import retrain_choice


def _cfg(strategy: str = "oneshot", estimate: str = "loss", retrain_top_k: int = 1) -> SearchConfig:
    return SearchConfig(study_name="rank", space="quick", dataset=DataConfig(name="digits"),
                        strategy=strategy, retrain_top_k=retrain_top_k,
                        oneshot=OneshotConfig(estimate=estimate))


def test_oneshot_score_is_exp_minus_the_loss_only_for_oneshot_candidates_under_loss() -> None:
    metrics = {"val_acc": 0.9, "val_loss": 1.2, "latency_ms": 3.0}
    assert oneshot_score(metrics, _cfg()) == pytest.approx(math.exp(-1.2))
    assert objective_values(metrics, _cfg()) == [pytest.approx(math.exp(-1.2)), 3.0]
    # standalone searches, the accuracy estimate and trials without a loss (retrained) use val_acc
    assert oneshot_score(metrics, _cfg(strategy="standalone")) is None
    assert oneshot_score(metrics, _cfg(estimate="accuracy")) is None
    assert objective_values(metrics, _cfg(estimate="accuracy")) == [0.9, 3.0]
    assert oneshot_score({**metrics, "val_loss": None}, _cfg()) is None
    assert objective_values({**metrics, "val_loss": None}, _cfg()) == [0.9, 3.0]
    with pytest.raises(ValueError, match="no finite validation loss"):
        oneshot_score({**metrics, "val_loss": float("nan")}, _cfg())


def test_the_estimate_is_a_validated_choice() -> None:
    with pytest.raises(ValueError, match="estimate"):
        OneshotConfig(estimate="top5")  # type: ignore[arg-type]
    assert OneshotConfig().estimate == "loss"


def _study(rows: list[tuple[float, float | None, float]]) -> optuna.Study:
    """Candidates (val_acc, oneshot_score or None, latency_ms), told as a runner tells them."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for i, (acc, score, latency) in enumerate(rows):
        attrs = {"val_acc": acc, "latency_ms": latency, ESTIMATE_ATTR: True, "spec": {"backbone": "resnet18"}}
        if score is not None:
            attrs[ONESHOT_SCORE_ATTR] = score
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[score if score is not None else acc,
                                                                        latency],
                                     params={"x": i}, distributions={"x": CategoricalDistribution(range(9))},
                                     user_attrs=attrs))
    return study


def test_front_best_and_finalists_rank_candidates_by_their_score() -> None:
    # trial 0 has the higher top-1 estimate, trial 1 the lower loss (higher score), same latency
    study = _study([(0.95, 0.30, 5.0), (0.80, 0.50, 5.0), (0.70, 0.20, 1.0)])
    trials = study.get_trials(deepcopy=False)
    assert [ranked_accuracy(t) for t in trials] == [0.30, 0.50, 0.20]
    assert [t.number for t in pareto_front(study)] == [2, 1]
    assert select_best(study).number == 1
    assert [t.number for t in retrain_choice(study, _cfg(retrain_top_k=2))] == [1, 2]
    # without scores (oneshot.estimate "accuracy", or studies from before it): the top-1 estimates
    plain = _study([(0.95, None, 5.0), (0.80, None, 5.0), (0.70, None, 1.0)])
    assert [t.number for t in pareto_front(plain)] == [2, 0]
    assert select_best(plain).number == 0
    assert [t.number for t in retrain_choice(plain, _cfg(estimate="accuracy", retrain_top_k=2))] == [0, 2]


def test_the_finalists_and_the_ties_of_best_follow_the_score() -> None:
    # trial 1 has the best score; trial 2's score is within the tolerance of it (same latency),
    # though its top-1 estimate is far lower; trials 0 and 3 lead by top-1 estimate only
    study = _study([(0.95, 0.30, 5.0), (0.80, 0.50, 5.0), (0.60, 0.495, 5.0), (0.945, 0.10, 5.0)])
    assert [t.number for t in finalist_trials(study, accuracy_tolerance=0.01)] == [1, 2]
    decision = decide_best(study, accuracy_tolerance=0.01)
    assert decision.chosen.number == 1
    assert [t.number for t in decision.tied] == [1, 2]
    assert "one-shot score" in decision.rule and "one-shot score" in decision.tie_rule
    # the top-1 estimates rank where there are no scores (oneshot.estimate "accuracy")
    plain = _study([(0.95, None, 5.0), (0.80, None, 5.0), (0.60, None, 5.0), (0.945, None, 5.0)])
    assert [t.number for t in finalist_trials(plain, accuracy_tolerance=0.01)] == [0, 3]
    plain_decision = decide_best(plain, accuracy_tolerance=0.01)
    assert [t.number for t in plain_decision.tied] == [0, 3]
    assert "validation accuracy" in plain_decision.rule
