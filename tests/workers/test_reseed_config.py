"""The search config's `reseed` section (top-k re-trained with more seeds at the end): validation naming
the field (model, CLI), the local runner reading it, stop/timeout/failure recorded, and the score
objective's tie on the seeds' intervals."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from pydantic import ValidationError

from search_spaces.config import ReseedConfig, SearchConfig
from search_spaces.finalists import SEEDS_ATTR, decide_best, seeds_entry
from search_spaces.keys import LATENCY_CI_ATTR, PHASE_ATTR
from search_spaces.study import create_study, mnas_score, study_config
from service.cli import main
from spsa_nas.errors import format_validation_error
from workers.finalists import reseed_top_k
from workers.local import run_local

SPEC = {"backbone": "resnet18", "num_classes": 10, "in_channels": 1, "stem": "cifar", "input_size": 8,
        "width": 0.25, "stages": [{}, {}, {}, {}]}


@pytest.mark.parametrize(("reseed", "field", "words"), [
    ({"top_k": -1}, "reseed.top_k", "greater than or equal to 0"),
    ({"seeds": 1}, "reseed.seeds", "greater than or equal to 2"),
    ({"top_k": 101}, "reseed.top_k", "less than or equal to 100"),
    ({"top_k": 2, "seed": 3}, "reseed.seed", "Extra inputs are not permitted"),
])
def test_bad_reseed_values_name_the_field(reseed: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        SearchConfig(reseed=reseed)
    message = format_validation_error(caught.value)
    assert f"{field}: " in message and words in message, message


def test_reseed_is_off_by_default_and_refused_for_detection() -> None:
    assert SearchConfig().reseed == ReseedConfig(top_k=0, seeds=2)
    assert ReseedConfig(top_k=3, seeds=4).trainings() == 9
    with pytest.raises(ValidationError, match=r"reseed.top_k: a detection search's trials are not"):
        SearchConfig(space="detection_quick", dataset={"name": "shapes"}, reseed={"top_k": 1})


def test_the_cli_flags_map_onto_the_config_and_bad_ones_exit_2(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    common = ["search", "--space", "quick", "--dataset", "digits", "--storage", url]
    for flag, value, words in (("--reseed-seeds", "1", "greater than or equal to 2"),
                               ("--reseed.top-k", "-2", "greater than or equal to 0")):
        with pytest.raises(SystemExit) as caught:
            main([*common, flag, value])
        assert caught.value.code == 2
        err = capsys.readouterr().err
        assert "--reseed" in err and words in err, err
    assert main(["search", "--space", "detection_quick", "--dataset", "shapes", "--storage", url,
                 "--reseed-top-k", "1"]) == 2
    assert "reseed.top_k: a detection search's trials" in capsys.readouterr().err
    assert not (tmp_path / "s.db").exists()  # refused before anything was created


def _study(tmp_path: Path, rows: list[tuple[float, dict[str, Any]]], **cfg: Any) -> tuple[str, optuna.Study]:
    """A study whose complete trials (val_acc, spec) are already there (no training)."""
    url = f"sqlite:///{tmp_path}/s.db"
    study = create_study(SearchConfig(study_name="rs", device="cpu", trials=len(rows), **cfg), url)
    for acc, spec in rows:
        attrs = {"val_acc": acc, "latency_ms": 2.0, LATENCY_CI_ATTR: [1.9, 2.1], "spec": spec}
        study.add_trial(optuna.trial.create_trial(values=[acc, 2.0], user_attrs=attrs))
    return url, study


def test_a_stop_or_the_deadline_is_recorded_and_nothing_is_lost(tmp_path: Path) -> None:
    _, study = _study(tmp_path, [(0.9, SPEC), (0.8, SPEC), (0.7, SPEC)])
    record = reseed_top_k(study, top_k=2, seeds=3, device="cpu", deadline=time.time() - 1)
    assert record is not None and record["stopped"] == "timeout" and record["trials"] == {}
    assert record["planned"] == [0, 1] and study.user_attrs[SEEDS_ATTR] == record
    record = reseed_top_k(study, top_k=1, seeds=2, device="cpu", should_stop=lambda: True)
    assert record is not None and record["stopped"] == "cancelled" and record["planned"] == [0]
    with pytest.raises(ValueError, match="seeds must be at least 2"):
        reseed_top_k(study, top_k=1, seeds=1)


def test_the_local_runner_reads_reseed_from_the_config_and_a_failure_never_fails_it(tmp_path: Path) -> None:
    bad = {**SPEC, "backbone": "no-such-backbone"}  # re-training it fails at once
    url, study = _study(tmp_path, [(0.9, bad), (0.8, SPEC)], reseed={"top_k": 1, "seeds": 2})
    report = run_local("rs", url, artifact_dir=tmp_path / "a", remeasure_finalists=False)
    assert report.outcome == "done", report  # all trials were there: straight to the end of the run
    record = study.user_attrs[SEEDS_ATTR]
    assert record["planned"] == [0] and record["trials"] == {} and "no-such-backbone" in record["error"]
    assert study.user_attrs.get(PHASE_ATTR) is None  # "reseed" while it ran, then as it was
    with pytest.raises(ValueError, match=r"reseed.seeds: Input should be greater than or equal to 2"):
        run_local("rs", url, artifact_dir=tmp_path / "a", reseed_seeds=1)


def test_a_resumed_search_may_change_its_reseed(tmp_path: Path) -> None:
    url, _ = _study(tmp_path, [(0.9, SPEC)])
    resumed = create_study(SearchConfig(study_name="rs", device="cpu", trials=1, reseed={"top_k": 2}), url)
    assert study_config(resumed).reseed.top_k == 2  # stored: the runners read it from the study


def _score_study(tmp_path: Path, accs: list[float]) -> optuna.Study:
    objective = {"kind": "score", "latency_target_ms": 2.0}
    study = create_study(SearchConfig(study_name="score", device="cpu", objective=objective),
                         f"sqlite:///{tmp_path}/score.db")
    cfg = study_config(study).objective
    for acc in accs:  # the same latency, a narrow interval: the score's range is the accuracy's
        attrs = {"val_acc": acc, "latency_ms": 2.0, LATENCY_CI_ATTR: [1.99, 2.01], "spec": SPEC}
        study.add_trial(optuna.trial.create_trial(values=[mnas_score(acc, 2.0, cfg)], user_attrs=attrs))
    return study


def test_the_score_objective_ties_on_the_seeds_intervals(tmp_path: Path) -> None:
    study = _score_study(tmp_path, [0.90, 0.87])
    assert [t.number for t in decide_best(study).tied] == [0]  # 0.03 apart: beyond ± 0.01
    study.set_user_attr(SEEDS_ATTR, {"at": "now", "seeds": 2, "top_k": 2, "trials": {
        "0": seeds_entry({0: 0.90, 1: 0.88}),  # mean 0.89 ± 0.014: [0.876, 0.904]
        "1": seeds_entry({0: 0.87, 1: 0.88}),  # mean 0.875 ± 0.007: [0.868, 0.882], overlaps
    }})
    decision = decide_best(study)
    assert [t.number for t in decision.tied] == [0, 1]  # within the seeds' noise
    assert "mean ± std" in decision.tie_rule
    assert "re-trained with 2+ training seeds" in decision.accuracy_noise
    assert decision.to_dict()["tied"][1]["seeds"] == 2


def test_the_score_objective_seeds_can_also_separate(tmp_path: Path) -> None:
    study = _score_study(tmp_path, [0.90, 0.895])
    assert [t.number for t in decide_best(study).tied] == [0, 1]  # within ± 0.01: one seed can't tell
    study.set_user_attr(SEEDS_ATTR, {"at": "now", "seeds": 2, "top_k": 2, "trials": {
        "0": seeds_entry({0: 0.90, 1: 0.90}), "1": seeds_entry({0: 0.895, 1: 0.895})}})
    assert [t.number for t in decide_best(study).tied] == [0]  # no spread over seeds: apart
