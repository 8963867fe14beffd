"""The ablation table of a study (search_spaces.compare) and `spsa-nas compare`: cells counted and averaged
by hand on a real SQLite study whose trials carry known specs and metrics."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import optuna
import pytest

from search_spaces.compare import ANY_STAGE, EVERY_STAGE, compare_study, stage_choices
from search_spaces.config import SearchConfig
from search_spaces.finalists import remeasurement_record
from search_spaces.keys import FINALISTS_ATTR
from search_spaces.study import create_study
from service.cli import main

NONE: dict[str, Any] = {"spsa": False, "channel_attn": "none"}
SPSA_ON: dict[str, Any] = {"spsa": True, "spsa_heads": 1, "channel_attn": "none"}  # old spec: no new fields
SPSA_OFF_COS: dict[str, Any] = {"spsa": True, "spsa_reverse": False, "spsa_similarity": "cosine",
                                "channel_attn": "se"}
NL: dict[str, Any] = {"spsa": False, "spatial_attn": "nonlocal", "channel_attn": "none"}
GC: dict[str, Any] = {"spsa": False, "spatial_attn": "gc", "channel_attn": "eca"}


def _spec(*stages: dict[str, Any]) -> dict[str, Any]:
    return {"backbone": "resnet18", "stem": "cifar", "width": 0.25, "num_classes": 10, "in_channels": 1,
            "input_size": 16, "stages": list(stages)}


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    return create_study(SearchConfig(study_name="ablation"), f"sqlite:///{tmp_path}/study.db")


def _add(study: optuna.Study, stages: tuple[dict[str, Any], ...], acc: float, lat: float,
         state: optuna.trial.TrialState = optuna.trial.TrialState.COMPLETE, **extra: Any) -> int:
    attrs = {"spec": _spec(*stages), "val_acc": acc, "latency_ms": lat, "top1": acc - 0.01, **extra}
    values = [acc, lat] if state == optuna.trial.TrialState.COMPLETE else None
    study.add_trial(optuna.trial.create_trial(state=state, values=values, user_attrs=attrs))
    return len(study.trials) - 1


def _cell(summary: dict[str, Any], dimension: str, scope: str, choice: str) -> dict[str, Any] | None:
    key = (dimension, scope, choice)
    found = [c for c in summary["cells"] if (c["dimension"], c["scope"], c["choice"]) == key]
    assert len(found) <= 1
    return found[0] if found else None


def _trials(summary: dict[str, Any], dimension: str, scope: str, choice: str) -> list[int]:
    """The trial numbers of a cell ([] when the cell does not exist)."""
    cell = _cell(summary, dimension, scope, choice)
    return cell["trials"] if cell is not None else []


@pytest.fixture
def filled(study: optuna.Study) -> optuna.Study:
    _add(study, (SPSA_ON, SPSA_ON), 0.90, 4.0)  # 0: SPSA with reverse, correlation, everywhere
    _add(study, (SPSA_ON, NONE), 0.80, 3.0)  # 1
    _add(study, (SPSA_OFF_COS, SPSA_ON), 0.70, 5.0)  # 2: mixed reverse and similarity
    _add(study, (NL, GC), 0.60, 6.0)  # 3
    _add(study, (NONE, NONE), 0.50, 2.0)  # 4
    _add(study, (GC, GC), 0.65, 7.0)  # 5
    _add(study, (SPSA_ON, SPSA_ON), 0.99, 1.0, state=optuna.trial.TrialState.PRUNED)  # 6: excluded
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                              user_attrs={"spec": _spec(NL, NL)}))  # 7: excluded
    study.add_trial(optuna.trial.create_trial(values=[0.3, 1.0], user_attrs={"val_acc": 0.3}))  # 8: no spec
    return study


def test_stage_choices_read_old_stages_with_the_defaults() -> None:
    assert stage_choices(SPSA_ON) == {"spatial_attn": "spsa", "spsa_reverse": "on",
                                      "spsa_similarity": "correlation", "channel_attn": "none"}
    assert stage_choices(SPSA_OFF_COS) == {"spatial_attn": "spsa", "spsa_reverse": "off",
                                           "spsa_similarity": "cosine", "channel_attn": "se"}
    assert stage_choices(GC) == {"spatial_attn": "gc", "spsa_reverse": None, "spsa_similarity": None,
                                 "channel_attn": "eca"}
    assert stage_choices({}) == {"spatial_attn": "none", "spsa_reverse": None, "spsa_similarity": None,
                                 "channel_attn": "none"}


def test_cells_count_and_average_by_hand(filled: optuna.Study) -> None:
    summary = compare_study(filled)
    assert summary["counts"] == {"summarised": 6, "complete_without_metrics": 1, "pruned": 1, "fail": 1,
                                 "running": 0, "waiting": 0}
    every_trial = {n for c in summary["cells"] for n in c["trials"]}
    assert every_trial == {0, 1, 2, 3, 4, 5}  # pruned 6, failed 7 and spec-less 8 are in no cell

    # stage 1's spatial attention: spsa in trials 0, 1, 2; nonlocal 3; none 4; gc 5
    spsa1 = _cell(summary, "spatial_attn", "stage 1", "spsa")
    assert spsa1 is not None and spsa1["trials"] == [0, 1, 2] and spsa1["n"] == 3
    assert spsa1["val_acc_mean"] == pytest.approx((0.90 + 0.80 + 0.70) / 3)
    assert spsa1["val_acc_std"] == pytest.approx(statistics.stdev([0.90, 0.80, 0.70]))
    assert spsa1["val_acc_sem"] == pytest.approx(statistics.stdev([0.90, 0.80, 0.70]) / math.sqrt(3))
    assert spsa1["latency_ms_mean"] == pytest.approx(4.0)
    assert spsa1["top1_mean"] == pytest.approx(0.79)
    assert _trials(summary, "spatial_attn", "stage 1", "nonlocal") == [3]
    nl = _cell(summary, "spatial_attn", "stage 1", "nonlocal")
    assert nl is not None and nl["val_acc_std"] is None and nl["val_acc_mean"] == pytest.approx(0.60)
    # stage 2: spsa 0, 2; none 1, 4; gc 3, 5
    assert _trials(summary, "spatial_attn", "stage 2", "gc") == [3, 5]
    assert _trials(summary, "spatial_attn", "stage 2", "none") == [1, 4]

    # any stage: a trial once per choice it has anywhere; every stage: only uniform trials
    assert _trials(summary, "spatial_attn", ANY_STAGE, "spsa") == [0, 1, 2]
    assert _trials(summary, "spatial_attn", ANY_STAGE, "none") == [1, 4]
    assert _trials(summary, "spatial_attn", ANY_STAGE, "gc") == [3, 5]
    assert _trials(summary, "spatial_attn", EVERY_STAGE, "spsa") == [0, 2]
    assert _trials(summary, "spatial_attn", EVERY_STAGE, "gc") == [5]
    assert _cell(summary, "spatial_attn", EVERY_STAGE, "nonlocal") is None  # 3 mixes NL and GC

    # reverse and similarity: among SPSA stages only
    on_any = _cell(summary, "spsa_reverse", ANY_STAGE, "on")
    off_any = _cell(summary, "spsa_reverse", ANY_STAGE, "off")
    assert on_any is not None and on_any["trials"] == [0, 1, 2]
    assert on_any["val_acc_mean"] == pytest.approx(0.80) and on_any["latency_ms_mean"] == pytest.approx(4.0)
    assert off_any is not None and off_any["trials"] == [2]
    assert _trials(summary, "spsa_reverse", EVERY_STAGE, "on") == [0, 1]
    assert _cell(summary, "spsa_reverse", EVERY_STAGE, "off") is None
    assert _trials(summary, "spsa_reverse", "stage 2", "on") == [0, 2]
    assert _trials(summary, "spsa_similarity", "stage 1", "cosine") == [2]
    assert _trials(summary, "spsa_similarity", "stage 1", "correlation") == [0, 1]
    reverse_cells = [c for c in summary["cells"] if c["dimension"] == "spsa_reverse"]
    assert not [c for c in reverse_cells if {3, 4, 5} & set(c["trials"])]

    # channel attention over every stage: se (trial 2, stage 1), eca (3 and 5)
    assert _trials(summary, "channel_attn", ANY_STAGE, "eca") == [3, 5]
    assert _trials(summary, "channel_attn", EVERY_STAGE, "eca") == [5]
    assert _trials(summary, "channel_attn", EVERY_STAGE, "none") == [0, 1, 4]
    assert "several cells" in summary["counting"]
    # the cells come in the order of the table: dimension, stage 1, stage 2, any, every
    dims = [c["dimension"] for c in summary["cells"]]
    assert dims == sorted(dims, key=["spatial_attn", "spsa_reverse", "spsa_similarity", "channel_attn"].index)


def test_remeasured_finalists_count_with_their_remeasured_figure(filled: optuna.Study) -> None:
    record = remeasurement_record({0: {"median_ms": 9.0, "figure_ms": 10.0, "ratio": 1.0},
                                   1: {"median_ms": 1.5, "figure_ms": 2.0}}, device="cpu", reference=None)
    filled.set_user_attr(FINALISTS_ATTR, record)
    summary = compare_study(filled)
    cell = _cell(summary, "spsa_reverse", EVERY_STAGE, "on")  # trials 0 and 1, both finalists
    assert cell is not None and cell["n_remeasured"] == 2
    assert cell["latency_ms_mean"] == pytest.approx((10.0 + 2.0) / 2)
    assert cell["latency_first_pass_ms_mean"] == pytest.approx((4.0 + 3.0) / 2)
    assert summary["remeasured_at"] == record["at"]


def test_a_running_study_is_summarised_so_far(study: optuna.Study) -> None:
    _add(study, (SPSA_ON, NONE), 0.8, 3.0)
    running = study.ask()
    running.set_user_attr("spec", _spec(GC, GC))
    summary = compare_study(study)
    assert summary["counts"]["running"] == 1 and summary["counts"]["summarised"] == 1
    assert {c["choice"] for c in summary["cells"] if c["dimension"] == "spatial_attn"} == {"spsa", "none"}


def test_cli_compare_prints_the_table_and_json(filled: optuna.Study, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/study.db"
    assert main(["compare", "ablation", "--storage", url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(json.dumps(compare_study(filled)))
    assert main(["compare", "--storage", url]) == 0  # the only study there
    text = capsys.readouterr().out
    assert "spatial attention" in text and "SPSA reverse" in text and "nonlocal" in text
    assert "6 completed trials summarised" in text and "1 pruned, 1 failed" in text
    assert main(["compare", "nope", "--storage", url]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    assert main(["compare", "ablation", "--study", "other", "--storage", url]) == 2
    assert "two study names" in capsys.readouterr().err
