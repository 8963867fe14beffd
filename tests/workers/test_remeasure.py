"""Re-measuring a study's finalists together (workers.finalists) and `spsa-nas remeasure` / `best`
showing the re-measured figures with their intervals beside the first-pass ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest

from search_spaces.config import SearchConfig
from search_spaces.finalists import NOTE_MARK
from search_spaces.keys import FINALISTS_ATTR, LATENCY_CI_ATTR
from search_spaces.study import create_study
from service.cli import main
from spsa_nas.config import LatencyConfig
from spsa_nas.spec import ArchSpec, StageSpec

# A short protocol: a few small blocks, a small budget (the figures are not what these tests check).
QUICK = LatencyConfig(warmup=1, repeats=4, blocks=4, block_ms=2.0, max_time_s=0.3, max_warmup_s=0.2)


def _note(study: optuna.Study) -> str:
    from optuna_dashboard._note import get_note_from_system_attrs

    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    return str(get_note_from_system_attrs(system_attrs, None)["body"])


def _spec(attn: str) -> dict[str, Any]:
    return ArchSpec.uniform("resnet18", StageSpec(channel_attn=attn), width=0.25, stem="cifar", input_size=16,
                            num_classes=10, in_channels=1).model_dump(mode="json")


@pytest.fixture
def study(tmp_path: Path) -> tuple[str, optuna.Study]:
    url = f"sqlite:///{tmp_path}/study.db"
    study = create_study(SearchConfig(study_name="fin", latency=QUICK, device="cpu"), url)
    for acc, lat, attn in [(0.90, 3.0, "se"), (0.80, 1.0, "none"), (0.70, 4.0, "eca")]:
        attrs = {"val_acc": acc, "latency_ms": lat, LATENCY_CI_ATTR: [lat - 0.1, lat + 0.1],
                 "spec": _spec(attn)}
        study.add_trial(optuna.trial.create_trial(values=[acc, lat], user_attrs=attrs))
    return url, study


def test_remeasure_stores_the_front_side_by_side_and_best_shows_it(
        study: tuple[str, optuna.Study], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = study
    assert main(["remeasure", "--storage", url, "--study", "fin", "--lock-dir", str(tmp_path / "locks"),
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["trials"]) == {"0", "1"}  # the front; trial 2 is dominated and far from the best
    for figure in record["trials"].values():
        assert figure["protocol"] == "interleaved" and figure["group_size"] == 3  # both + the reference
        assert figure["ci_low_ms"] <= figure["median_ms"] <= figure["ci_high_ms"]
        assert figure["ratio"] is not None and figure["reference"] == record["reference"]["name"]
    loaded = optuna.load_study(study_name="fin", storage=url)
    assert loaded.user_attrs[FINALISTS_ATTR] == record
    assert [t.user_attrs["latency_ms"] for t in loaded.trials] == [3.0, 1.0, 4.0]  # first pass unchanged
    note = _note(loaded)
    assert note.startswith(NOTE_MARK) and "| 0 | 0.9000 |" in note

    assert main(["best", "--storage", url, "--study", "fin", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["best"]["trial"] == 0 and best["best"]["latency_ms"] == 3.0
    assert best["best"]["latency_remeasured_ms"] == record["trials"]["0"]["figure_ms"]
    assert best["best"]["latency_remeasured_time_ms"] == record["trials"]["0"]["median_ms"]
    assert best["best"]["latency"]["latency_source"] == "remeasured"
    assert best["tie"]["decided"] and best["tie"]["chosen"] == 0
    assert [row["latency_remeasured_ms"] is not None for row in best["pareto_front"]] == [True, True]
    assert best["finalists"]["device"] == "cpu"

    assert main(["best", "--storage", url, "--study", "fin"]) == 0
    text = capsys.readouterr().out
    assert "re-measured" in text and "no other candidate is within the noise" in text


def test_a_note_written_by_a_person_is_left_alone(study: tuple[str, optuna.Study], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from optuna_dashboard import save_note

    url, opened = study
    save_note(opened, "my own notes")
    assert main(["remeasure", "--storage", url, "--study", "fin", "--lock-dir", str(tmp_path / "locks")]) == 0
    assert "re-measured" in capsys.readouterr().out
    loaded = optuna.load_study(study_name="fin", storage=url)
    assert _note(loaded) == "my own notes"
    assert loaded.user_attrs[FINALISTS_ATTR]["trials"]


def test_remeasure_of_a_study_without_finalists_is_a_usage_error(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/empty.db"
    create_study(SearchConfig(study_name="empty"), url)
    assert main(["remeasure", "--storage", url, "--study", "empty", "--lock-dir", str(tmp_path / "l")]) == 2
    assert "no complete trial with a spec" in capsys.readouterr().err


TINY_SPACE = """\
name: tiny
description: the smallest real space
backbone: resnet18
stem: cifar
input_size: 16
width: [0.25]
all_stages:
  spsa: [false, true]
  heads: [1]
  alpha: [1]
  channel_attn: [none, se]
"""


@pytest.mark.slow
@pytest.mark.ray
def test_a_finished_ray_run_remeasures_its_finalists(ray_local: None, tmp_path: Path) -> None:
    """Real trials on a local Ray; after the last one the coordinator re-measures the front together."""
    from search_spaces.finalists import finalist_trials
    from spsa_nas.config import DataConfig, TrainConfig
    from workers.ray_runner import RunnerOptions, run_search

    url = f"sqlite:///{tmp_path}/run.db"
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    cfg = SearchConfig(study_name="run", space=str(space), trials=3, sampler="random", device="cpu",
                       dataset=DataConfig(name="digits", train_subset=96),
                       train=TrainConfig(epochs=1, batch_size=16), latency=QUICK)
    create_study(cfg, url)
    options = RunnerOptions(heartbeat_s=0.5, lease_s=30.0, poll_s=0.2, lock_dir=str(tmp_path / "locks"))
    report = run_search("run", url, artifact_dir=tmp_path / "artifacts", options=options)
    assert report.outcome == "done" and report.counts["complete"] == 3, report
    study = optuna.load_study(study_name="run", storage=url)
    record = study.user_attrs[FINALISTS_ATTR]
    assert record["error"] is None, record
    assert set(record["trials"]) == {str(t.number) for t in finalist_trials(study)}
    for trial in study.trials:  # the first pass: the figure, its interval, time, ratio and anchor
        a = trial.user_attrs
        assert a["latency_ci_ms"][0] <= a["latency_ms"] <= a["latency_ci_ms"][1]
        assert a["latency_ms"] == pytest.approx(a["latency_ratio"] * a["latency_anchor_ms"])
        assert a["latency_time_ms"] == a["latency"]["median_ms"] and trial.values[1] == a["latency_ms"]
    for figure in record["trials"].values():
        assert figure["group_size"] == len(record["trials"]) + 1
        anchor = study.trials[0].user_attrs["latency_anchor_ms"]
        assert figure["figure_ms"] == pytest.approx(figure["ratio"] * anchor)
