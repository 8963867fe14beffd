"""Accuracy noise: the top-k re-trained with more seeds (`spsa-nas reseed`, workers.finalists.reseed_top_k)
and `best`'s tie rule on their accuracy intervals (mean ± std) instead of the one-seed tolerance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest

from search_spaces.config import ReseedConfig, SearchConfig
from search_spaces.finalists import SEEDS_ATTR, decide_best, seeds_entry
from search_spaces.keys import LATENCY_CI_ATTR, PHASE_ATTR
from search_spaces.study import create_study, study_config
from service.cli import main
from tests.workers.test_local_finalists import FLAGS, TINY_YAML


def _study(tmp_path: Path, rows: list[tuple[float, float]]) -> optuna.Study:
    study = create_study(SearchConfig(study_name="seeds", device="cpu"), f"sqlite:///{tmp_path}/s.db")
    for acc, ms in rows:
        attrs: dict[str, Any] = {"val_acc": acc, "latency_ms": ms, LATENCY_CI_ATTR: [ms - 0.2, ms + 0.2]}
        study.add_trial(optuna.trial.create_trial(values=[acc, ms], user_attrs=attrs))
    return study


def test_one_seed_says_so_and_uses_the_tolerance(tmp_path: Path) -> None:
    study = _study(tmp_path, [(0.90, 2.0), (0.87, 1.9), (0.895, 2.0)])
    decision = decide_best(study)
    assert [t.number for t in decision.tied] == [0, 2]  # 0.895 is within ± 0.01; 0.87 is not
    assert decision.accuracy_noise.startswith("one training seed per candidate")
    assert ["seeds" in row for row in decision.to_dict()["tied"]] == [False, False]


def test_seed_intervals_decide_the_accuracy_tie(tmp_path: Path) -> None:
    study = _study(tmp_path, [(0.90, 2.0), (0.87, 1.9), (0.895, 2.0)])
    study.set_user_attr(SEEDS_ATTR, {"at": "now", "seeds": 2, "top_k": 3, "trials": {
        "0": seeds_entry({0: 0.90, 1: 0.88}),  # mean 0.89, std 0.014: [0.876, 0.904]
        "1": seeds_entry({0: 0.87, 1: 0.88}),  # mean 0.875, std 0.007: overlaps trial 0's
        "2": seeds_entry({0: 0.895, 1: 0.805}),  # mean 0.85, std 0.064: [0.786, 0.914]: overlaps
    }})
    decision = decide_best(study)
    assert decision.chosen.number == 0  # the pick's rule is unchanged
    assert [t.number for t in decision.tied] == [0, 2, 1]  # 1 now tied: 0.03 behind, within the seeds' noise
    assert "trials 0, 1, 2 re-trained with 2+ training seeds" in decision.accuracy_noise
    row = decision.to_dict()["tied"][2]
    assert row["trial"] == 1 and row["seeds"] == 2 and row["val_acc_mean"] == pytest.approx(0.875)

    study.set_user_attr(SEEDS_ATTR, {"at": "now", "seeds": 2, "top_k": 2, "trials": {
        "0": seeds_entry({0: 0.90, 1: 0.90}),  # no spread: [0.90, 0.90]
        "2": seeds_entry({0: 0.895, 1: 0.895}),  # [0.895, 0.895]: apart, though within the tolerance
    }})
    assert [t.number for t in decide_best(study).tied] == [0]


@pytest.mark.slow
def test_reseed_retrains_the_top_k_with_more_seeds(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_YAML)
    url = f"sqlite:///{tmp_path}/study.db"
    assert main(["search", "--space", str(space), *FLAGS, "--storage", url,
                 "--artifacts", str(tmp_path / "artifacts"), "--no-remeasure"]) == 0
    capsys.readouterr()
    assert main(["reseed", "--storage", url, "--seeds", "1"]) == 2
    assert "seeds must be at least 2" in capsys.readouterr().err

    assert main(["reseed", "--storage", url, "--top-k", "2", "--seeds", "2", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    study = optuna.load_study(study_name="local-fin-digits", storage=url)
    assert study.user_attrs[SEEDS_ATTR] == record and len(study.trials) == 3  # no new trial
    complete = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                      key=lambda t: (-t.user_attrs["val_acc"], t.user_attrs["latency_ms"], t.number))
    assert list(record["trials"]) == [str(t.number) for t in complete[:2]]
    for trial in complete[:2]:
        entry = record["trials"][str(trial.number)]
        assert entry["seeds"] == 2 and set(entry["val_acc_by_seed"]) == {"0", "1"}
        assert entry["val_acc_by_seed"]["0"] == trial.user_attrs["val_acc"]  # the trial's own run
        assert 0.0 <= entry["val_acc_by_seed"]["1"] <= 1.0 and entry["val_acc_std"] >= 0.0

    assert main(["best", "--storage", url, "--json"]) == 0
    tie = json.loads(capsys.readouterr().out)["tie"]
    assert tie["tied"][0]["seeds"] == 2 and "re-trained with 2+ training seeds" in tie["accuracy_noise"]


@pytest.mark.slow
def test_a_local_search_can_end_by_reseeding_its_top_k(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_YAML)
    url = f"sqlite:///{tmp_path}/study.db"
    common = ["search", "--space", str(space), *FLAGS, "--storage", url, "--artifacts", str(tmp_path / "a")]
    assert main([*common, "--trials", "2", "--no-remeasure", "--reseed-top-k", "1"]) == 0
    assert "re-trained with 2 seeds: trials " in capsys.readouterr().err
    study = optuna.load_study(study_name="local-fin-digits", storage=url)
    record = study.user_attrs[SEEDS_ATTR]
    assert record["top_k"] == 1 and record["seeds"] == 2 and len(record["trials"]) == 1
    assert record["stopped"] is None and record["error"] is None
    assert record["planned"] == [int(*record["trials"])]
    assert study_config(study).reseed == ReseedConfig(top_k=1, seeds=2)  # the flag set the config
    assert study.user_attrs.get(PHASE_ATTR) is None  # "reseed" while it ran, then as it was
