"""The finalists and the tie rule of `best`: overlapping intervals give a tie set, re-measured figures
count over first-pass ones, records without an interval still load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from search_spaces.config import ObjectiveConfig, SearchConfig
from search_spaces.finalists import (
    anchor_attr,
    anchor_ms,
    decide_best,
    finalist_trials,
    finalists_note,
    latency_figure,
    normalized,
    remeasurement_record,
)
from search_spaces.keys import FINALISTS_ATTR, LATENCY_CI_ATTR
from search_spaces.study import create_study

SPEC = {"backbone": "resnet18"}


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    return create_study(SearchConfig(study_name="ties"), f"sqlite:///{tmp_path}/study.db")


def _add(study: optuna.Study, acc: float, lat: float, ci: list[float] | None, **extra: Any) -> int:
    attrs: dict[str, Any] = {"val_acc": acc, "latency_ms": lat, "spec": SPEC, **extra}
    if ci is not None:
        attrs[LATENCY_CI_ATTR] = ci
    values = [acc, lat] if len(study.directions) == 2 else [extra.pop("score", acc)]
    study.add_trial(optuna.trial.create_trial(values=values, user_attrs=attrs))
    return len(study.trials) - 1


def test_overlapping_intervals_and_close_accuracies_are_a_tie_set(study: optuna.Study) -> None:
    a = _add(study, 0.900, 3.00, [2.90, 3.10])
    b = _add(study, 0.895, 3.05, [2.95, 3.15])  # 0.5 points less accurate, its interval overlaps
    c = _add(study, 0.894, 3.60, [3.50, 3.70])  # close in accuracy but clearly slower: not tied
    d = _add(study, 0.850, 2.00, [1.95, 2.05])  # faster but clearly less accurate: not tied
    decision = decide_best(study)
    assert decision.chosen.number == a
    assert [t.number for t in decision.tied] == [a, b] and not decision.decided
    assert c not in [t.number for t in decision.tied] and d not in [t.number for t in decision.tied]
    out = decision.to_dict()
    assert out["tied"][1] == {"trial": b, "val_acc": 0.895, "latency_ms": 3.05, "latency_ci_ms": [2.95, 3.15],
                              "latency_source": "first_pass"}
    assert "highest validation accuracy" in out["rule"] and "one training seed" in out["accuracy_noise"]
    assert "0.01" in out["tie_rule"]


def test_a_clear_lead_is_decided_and_the_tolerance_is_a_parameter(study: optuna.Study) -> None:
    a = _add(study, 0.900, 3.00, [2.90, 3.10])
    _add(study, 0.895, 3.05, [2.95, 3.15])
    assert decide_best(study, accuracy_tolerance=0.001).decided  # 0.5 points is beyond 0.1
    assert decide_best(study, accuracy_tolerance=0.001).chosen.number == a
    with pytest.raises(ValueError, match="accuracy_tolerance"):
        decide_best(study, accuracy_tolerance=-0.1)


def test_a_faster_candidate_within_accuracy_noise_is_tied_even_without_overlap(study: optuna.Study) -> None:
    """The pick leads by a sub-noise accuracy margin while a candidate is clearly faster: the rule's
    choice rests on noise, so both come back."""
    a = _add(study, 0.900, 3.00, [2.90, 3.10])
    b = _add(study, 0.896, 2.00, [1.95, 2.05])
    decision = decide_best(study)
    assert [t.number for t in decision.tied] == [a, b]


def test_the_finalists_remeasurement_counts_over_the_first_pass(study: optuna.Study) -> None:
    a = _add(study, 0.900, 3.00, [2.90, 3.10])
    b = _add(study, 0.898, 3.05, [2.95, 3.15])
    assert not decide_best(study).decided
    # measured again side by side, b is clearly slower than a: decided on latency
    figures = {a: {"median_ms": 3.0, "ci_low_ms": 2.99, "ci_high_ms": 3.01, "ci_level": 0.95},
               b: {"median_ms": 3.3, "ci_low_ms": 3.28, "ci_high_ms": 3.32}}
    record = remeasurement_record(figures, device="cpu", reference=None)
    study.set_user_attr(FINALISTS_ATTR, record)
    decision = decide_best(study)
    assert decision.decided and decision.chosen.number == a
    assert decision.figures[b] is not None and decision.figures[b].source == "remeasured"
    assert "re-measured together" in decision.latency_noise
    assert decision.to_dict()["tied"][0]["latency_ci_ms"] == [2.99, 3.01]
    note = finalists_note(record, study.trials)
    assert "| 1 | 0.8980 | 3.300 [3.280, 3.320]" in note and "2.950, 3.150" in note


def test_records_without_an_interval_still_load_and_are_points(study: optuna.Study) -> None:
    """Trials of a study written before the interval was recorded (no latency_ci_ms)."""
    a = _add(study, 0.900, 3.00, None)
    b = _add(study, 0.899, 3.01, None)  # a point slower than the pick: not tied
    c = _add(study, 0.899, 2.99, None)  # a point faster: tied (the pick's lead is sub-noise accuracy)
    figure = latency_figure(study.trials[a])
    assert figure is not None and figure.low is None and figure.source == "first_pass"
    decision = decide_best(study)
    assert [t.number for t in decision.tied] == [a, c] and b in decision.figures
    assert "no interval" in decision.latency_noise


def test_score_studies_tie_on_overlapping_score_ranges(tmp_path: Path) -> None:
    objective = ObjectiveConfig(kind="score", latency_target_ms=3.0)
    study = create_study(SearchConfig(study_name="score", objective=objective), f"sqlite:///{tmp_path}/s.db")
    a = _add(study, 0.90, 3.0, [2.9, 3.1], score=0.90)
    b = _add(study, 0.89, 3.0, [2.9, 3.1], score=0.89)
    c = _add(study, 0.50, 3.0, [2.9, 3.1], score=0.50)
    decision = decide_best(study)
    assert decision.chosen.number == a and [t.number for t in decision.tied] == [a, b]
    assert c not in [t.number for t in decision.tied] and "score" in decision.tie_rule


def test_finalists_are_the_front_and_the_near_best(study: optuna.Study) -> None:
    a = _add(study, 0.90, 3.0, [2.9, 3.1])
    b = _add(study, 0.80, 1.0, [0.9, 1.1])  # on the front
    c = _add(study, 0.895, 3.5, [3.4, 3.6])  # dominated by a, but within 0.01 of it: could tie
    _add(study, 0.70, 4.0, [3.9, 4.1])  # dominated and far: not a finalist
    assert [t.number for t in finalist_trials(study)] == [b, a, c]
    assert [t.number for t in finalist_trials(study, max_count=2)] == [b, a]


def test_the_anchor_is_the_first_measurement_and_figures_are_ratio_times_anchor(study: optuna.Study) -> None:
    first = {"median_ms": 4.0, "ci_low_ms": 3.9, "ci_high_ms": 4.1, "ratio": 0.5, "ratio_ci_low": 0.49,
             "ratio_ci_high": 0.51, "reference": "resnet18 w0.5 plain", "reference_ms": 8.0,
             "device_name": "cpu x", "threads": 1, "input_shape": [1, 1, 16, 16], "torch_version": "2"}
    assert anchor_ms(study, first) == 8.0
    # later, the machine is twice as slow: time and reference both doubled, the ratio the same
    later = {**first, "median_ms": 8.0, "reference_ms": 16.0, "ratio": 0.5}
    anchor = anchor_ms(study, later)
    assert anchor == 8.0 and normalized(later, anchor) == (4.0, [0.49 * 8.0, 0.51 * 8.0])
    assert anchor_attr(first) == anchor_attr(later) and study.user_attrs[anchor_attr(first)]["ms"] == 8.0
    other = {**first, "threads": 2, "reference_ms": 5.0}  # other conditions: an anchor of their own
    assert anchor_attr(other) != anchor_attr(first) and anchor_ms(study, other) == 5.0
    plain = {"median_ms": 4.0, "ci_low_ms": 3.9, "ci_high_ms": 4.1, "ratio": None}  # no reference
    assert anchor_ms(study, plain) is None and normalized(plain, None) == (4.0, [3.9, 4.1])


def test_finalists_are_among_retrained_trials_when_there_are_some(study: optuna.Study) -> None:
    """A one-shot study's best and its ties are among its retrained trials, so only they are
    re-measured: the candidates' estimates, on the front or near the best, are not."""
    estimate = _add(study, 0.95, 1.0, [0.9, 1.1])  # the best estimate and the fastest: the front's
    near = _add(study, 0.945, 4.0, [3.9, 4.1])
    a = _add(study, 0.90, 3.0, [2.9, 3.1], retrain_of=estimate)
    b = _add(study, 0.85, 2.0, [1.9, 2.1], retrain_of=near)  # faster: on the retrained trials' front
    c = _add(study, 0.80, 3.5, [3.4, 3.6], retrain_of=7)  # dominated by a, and far from it
    assert [t.number for t in finalist_trials(study)] == [b, a]
    # near the best retrained accuracy (within the tolerance) counts among them, as before
    assert [t.number for t in finalist_trials(study, accuracy_tolerance=0.1)] == [b, a, c]


def test_ties_are_among_retrained_trials_when_there_are_some(study: optuna.Study) -> None:
    """A one-shot study picks among its retrained trials (measured accuracies); a supernet estimate
    close to the pick is no tie."""
    _add(study, 0.905, 3.0, [2.9, 3.1])  # an estimate (no retrain_of)
    a = _add(study, 0.900, 3.0, [2.9, 3.1], retrain_of=0)
    b = _add(study, 0.899, 3.0, [2.9, 3.1], retrain_of=5)
    decision = decide_best(study)
    assert decision.chosen.number == a and [t.number for t in decision.tied] == [a, b]
