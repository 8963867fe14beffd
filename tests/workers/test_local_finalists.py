"""A local search (`spsa-nas search` without Ray) ends by re-measuring its finalists together, so that
`spsa-nas best` shows re-measured figures; `--no-remeasure` turns it off."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import optuna
import pytest

from search_spaces.keys import FINALISTS_ATTR
from service.cli import main
from workers import finalists as finalists_module
from workers.local import run_local

pytestmark = pytest.mark.slow

TINY_YAML = """\
name: local-fin
backbone: resnet18
stem: cifar
input_size: 8
width: 0.25
all_stages:
  spsa: [false, true]
  heads: [1, 2]
  channel_attn: [none, eca]
"""

# a tiny search: digits subset, 1 epoch, 3 trials, a short latency protocol
FLAGS = ["--dataset", "digits", "--trials", "3", "--epochs", "1", "--train-subset", "160",
         "--batch-size", "16", "--latency-repeats", "3", "--latency-warmup", "1", "--latency.blocks", "4",
         "--latency.max-time-s", "0.3", "--latency.max-warmup-s", "0.2", "--device", "cpu"]


def _search(tmp_path: Path, *extra: str) -> tuple[str, optuna.Study]:
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_YAML)
    storage = f"sqlite:///{tmp_path}/study.db"
    assert main(["search", "--space", str(space), *FLAGS, "--storage", storage,
                 "--artifacts", str(tmp_path / "artifacts"), *extra]) == 0
    return storage, optuna.load_study(study_name="local-fin-digits", storage=storage)


def test_a_local_search_ends_with_its_finalists_remeasured(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    storage, study = _search(tmp_path)
    err = capsys.readouterr().err
    record = study.user_attrs[FINALISTS_ATTR]
    assert not record.get("error") and record["device"] == "cpu" and record["trials"]
    numbers = ", ".join(sorted(record["trials"], key=int))
    assert f"finalists re-measured together on cpu: trials {numbers}" in err
    complete = {t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert {int(n) for n in record["trials"]} <= complete
    for figure in record["trials"].values():
        assert figure["protocol"] == "interleaved"
        assert figure["ci_low_ms"] <= figure["median_ms"] <= figure["ci_high_ms"]

    assert main(["best", "--storage", storage, "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    chosen = str(best["best"]["trial"])
    assert chosen in record["trials"]  # the pick is a finalist: its re-measured figure is shown
    assert best["best"]["latency_remeasured_ms"] == record["trials"][chosen]["figure_ms"]
    assert best["best"]["latency"]["latency_source"] == "remeasured"
    assert best["best"]["latency_ms"] is not None  # the first pass stays visible
    assert "finalists re-measured together" in best["tie"]["latency_noise"]


def test_no_remeasure_leaves_the_first_pass_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage, study = _search(tmp_path, "--no-remeasure")
    assert FINALISTS_ATTR not in study.user_attrs
    assert "finalists re-measured" not in capsys.readouterr().err
    assert main(["best", "--storage", storage, "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["best"]["latency_remeasured_ms"] is None
    assert best["best"]["latency"]["latency_source"] == "first_pass"


def test_a_failed_remeasurement_is_recorded_and_the_search_still_ends_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_YAML)
    storage = f"sqlite:///{tmp_path}/study.db"
    assert main(["search", "--space", str(space), *FLAGS, "--trials", "1", "--storage", storage,
                 "--artifacts", str(tmp_path / "artifacts"), "--no-remeasure"]) == 0

    def broken(study: optuna.Study, **_: object) -> None:  # the measurement itself breaking
        raise RuntimeError("the reference would not build")

    monkeypatch.setattr(finalists_module, "remeasure_finalists", broken)
    with caplog.at_level(logging.WARNING, logger="workers.local"):
        report = run_local("local-fin-digits", storage, artifact_dir=tmp_path / "artifacts")
    assert report.outcome == "done" and report.ran == 0  # the one trial was finished already
    record = optuna.load_study(study_name="local-fin-digits", storage=storage).user_attrs[FINALISTS_ATTR]
    assert record["error"] == "RuntimeError: the reference would not build" and record["trials"] == {}
    assert "re-measurement failed" in caplog.text
