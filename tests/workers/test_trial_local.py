"""run_trial and run_local end to end: real SQLite storage, real artifact store, real tiny training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.trial import TrialState

from search_spaces.config import ObjectiveConfig, SearchConfig
from search_spaces.keys import RUNNER_ATTR
from search_spaces.loading import load_space
from search_spaces.storage import open_storage
from search_spaces.study import create_study, mnas_score, trial_counts
from spsa_nas import build_model
from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig
from spsa_nas.evaluate import EvalHooks
from spsa_nas.spec import ArchSpec
from workers.local import run_local
from workers.trial import run_trial

pytestmark = pytest.mark.slow

TINY = {
    "name": "tiny",
    "backbone": "resnet18",
    "stem": "cifar",
    "input_size": 8,  # digits' native size; stage 4 is 1x1 there
    "width": 0.25,
    "all_stages": {"spsa": [False, True], "heads": [1, 2], "channel_attn": ["none", "eca"]},
}
FIXED = {**TINY, "name": "fixed", "all_stages": {"spsa": [True], "heads": [2], "channel_attn": ["se"]}}


def _cfg(space: dict, **update: object) -> SearchConfig:
    base = SearchConfig(
        study_name="t",
        space=space,
        dataset=DataConfig(name="digits", train_subset=160),
        trials=2,
        train=TrainConfig(epochs=1, batch_size=16),
        latency=LatencyConfig(repeats=3, warmup=1),
        device="cpu",
    )
    return base.model_copy(update=update)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/study.db"


def test_run_trial_end_to_end_with_artifact(url: str, tmp_path: Path) -> None:
    cfg = _cfg(TINY)
    study = create_study(cfg, url)
    store = FileSystemArtifactStore(str(tmp_path / "artifacts"))
    (tmp_path / "artifacts").mkdir()
    frozen = run_trial(study, study.ask(), cfg, load_space(TINY), artifact_store=store)
    assert frozen.state == TrialState.COMPLETE, frozen.user_attrs.get("traceback")
    attrs = frozen.user_attrs
    for key in ("spec", "params", "flops", "latency", "latency_ms", "feasible", "val_curve", "val_acc",
                "top1", "top5", "epochs", "train_seconds", "device", "weights_artifact", "latency_key"):
        assert key in attrs, key
    assert frozen.values == [attrs["val_acc"], attrs["latency_ms"]]
    assert 0.0 <= attrs["val_acc"] <= 1.0 and attrs["latency_ms"] > 0 and attrs["params"] > 0
    spec = ArchSpec.model_validate(attrs["spec"])
    assert spec.num_classes == 10 and spec.in_channels == 1 and not spec.stages[3].spsa
    # the stored weights rebuild the trained model exactly
    weights = tmp_path / "w.safetensors"
    download_artifact(artifact_store=store, file_path=str(weights), artifact_id=attrs["weights_artifact"])
    model = build_model(spec, weights=weights).eval()
    assert not model.load_report.initialised and not model.load_report.mismatched
    x = torch.randn(2, 1, 8, 8)
    assert model(x).shape == (2, 10) and torch.isfinite(model(x)).all()


def test_identical_architectures_reuse_the_measured_latency(url: str, tmp_path: Path) -> None:
    cfg = _cfg(FIXED, objective=ObjectiveConfig(latency_budget_ms=1e-6))  # infeasible: no training
    study = create_study(cfg, url)
    store = FileSystemArtifactStore(str(tmp_path))
    first = run_trial(study, study.ask(), cfg, load_space(FIXED), artifact_store=store)
    second = run_trial(study, study.ask(), cfg, load_space(FIXED), artifact_store=store)
    for t in (first, second):
        assert t.state == TrialState.PRUNED
        assert t.user_attrs["feasible"] is False and "over the budget" in t.user_attrs["reason"]
        assert "weights_artifact" not in t.user_attrs
    assert first.user_attrs["latency_cached"] is False
    assert second.user_attrs["latency_cached"] is True
    assert second.user_attrs["latency_key"] == first.user_attrs["latency_key"]
    assert second.user_attrs["latency"] == first.user_attrs["latency"]


def test_exception_in_evaluate_is_a_failed_trial_with_traceback(url: str, tmp_path: Path) -> None:
    # the space fixes classes/channels, so the missing dataset is first met inside evaluate_spec
    space = {**FIXED, "num_classes": 10, "in_channels": 3}
    cfg = _cfg(space, dataset=DataConfig(name="imagefolder", path="nowhere", data_root=str(tmp_path)))
    study = create_study(cfg, url)
    frozen = run_trial(study, study.ask(), cfg, load_space(space),
                       artifact_store=FileSystemArtifactStore(str(tmp_path)))
    assert frozen.state == TrialState.FAIL
    assert "nowhere" in frozen.user_attrs["error"]
    assert "Traceback" in frozen.user_attrs["traceback"] and "evaluate_spec" in frozen.user_attrs["traceback"]


def test_keyboard_interrupt_fails_the_trial_and_propagates(url: str, tmp_path: Path) -> None:
    cfg = _cfg(FIXED)
    study = create_study(cfg, url)

    def interrupt(epoch: int, val_acc: float) -> None:
        raise KeyboardInterrupt

    trial = study.ask()
    with pytest.raises(KeyboardInterrupt):
        run_trial(study, trial, cfg, load_space(FIXED), artifact_store=FileSystemArtifactStore(str(tmp_path)),
                  extra_hooks=EvalHooks(on_epoch=interrupt))
    frozen = study.get_trials()[trial.number]
    assert frozen.state == TrialState.FAIL and frozen.user_attrs["error"] == "interrupted"


def test_run_local_finishes_and_resumes_after_a_dead_run(url: str, tmp_path: Path) -> None:
    # the score objective with a pruner: each epoch reports the score so far
    objective = ObjectiveConfig(kind="score", latency_target_ms=1.0, weight=-0.1)
    cfg = _cfg(TINY, trials=2, objective=objective, pruner="median")
    # a trial left RUNNING by a local run whose process is gone
    study = create_study(cfg, url)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = study.ask()
    stale.set_user_attr(RUNNER_ATTR, {"kind": "local", "host": __import__("socket").gethostname(),
                                      "pid": dead.pid})
    seen: list[int] = []
    summary = run_local("t", url, artifact_dir=tmp_path / "art",
                        progress=lambda s, t: seen.append(t.number))
    assert summary.recovered == [stale.number]
    assert summary.outcome == "done" and summary.finished == 2 and summary.ran == 2
    assert seen == [1, 2]
    study = optuna.load_study(study_name="t", storage=open_storage(url))
    assert study.get_trials()[0].state == TrialState.FAIL
    assert trial_counts(study) == {"complete": 2, "pruned": 0, "fail": 1, "running": 0, "waiting": 0}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        score = mnas_score(t.user_attrs["val_acc"], t.user_attrs["latency_ms"], objective)
        assert t.values == [pytest.approx(score)]
        assert t.intermediate_values == {1: pytest.approx(score)}  # one epoch, reported
    # the same call again: nothing left to do; more trials: it continues the same study
    assert run_local("t", url, artifact_dir=tmp_path / "art").ran == 0
    create_study(cfg.model_copy(update={"trials": 3}), url)
    more = run_local("t", url, artifact_dir=tmp_path / "art")
    assert more.ran == 1 and more.finished == 3
