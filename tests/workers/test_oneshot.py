"""The oneshot strategy end to end on the local runner and on Ray: supernet phase, candidates on
its weights, retraining, the best choice, and resumption after the process was killed."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.trial import TrialState
from safetensors.torch import load_file

from search_spaces.config import OneshotConfig, SearchConfig
from search_spaces.keys import ESTIMATE_ATTR, PHASE_ATTR, RETRAIN_ATTR, RETRAIN_OF_ATTR, supernet_records
from search_spaces.loading import load_space
from search_spaces.study import create_study, estimated_metrics, select_best
from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig
from spsa_nas.spec import ArchSpec
from spsa_nas.supernet import Supernet
from workers.local import run_local
from workers.oneshot import load_checkpoint, sandwich_extremes, supernet_bases, uniform_sampler

pytestmark = pytest.mark.slow

TINY = {"name": "tiny", "backbone": "resnet18", "stem": "cifar", "input_size": 8, "width": 0.125,
        "all_stages": {"spsa": [False, True], "heads": [1, 2], "alpha": {"low": 0.5, "high": 2, "log": True},
                       "channel_attn": ["none", "se", "eca"], "attn_order": ["channel_first", "spsa_first"]}}


def _cfg(**update: object) -> SearchConfig:
    cfg = SearchConfig(study_name="os", space=TINY, dataset=DataConfig(name="digits", train_subset=160),
                       trials=4, train=TrainConfig(epochs=1, batch_size=16), device="cpu",
                       latency=LatencyConfig(repeats=3, warmup=1), strategy="oneshot", retrain_top_k=1,
                       oneshot=OneshotConfig(epochs=2, bn_batches=2))
    return cfg.model_copy(update=update)


def test_uniform_sampler_draws_valid_paths_of_every_choice() -> None:
    space = load_space(TINY)
    (base,) = supernet_bases(_cfg(), space)
    sample = uniform_sampler(space, base)
    rng = random.Random(0)
    specs = [sample(rng) for _ in range(300)]
    stages = [s for spec in specs for s in spec.stages]
    assert {s.channel_attn for s in stages} == {"none", "se", "eca"}
    assert {s.spsa for s in stages} == {False, True}
    on = [s for s in stages if s.spsa]
    assert {s.spsa_heads for s in on} == {1, 2}
    assert min(s.spsa_alpha for s in on) >= 0.5 and max(s.spsa_alpha for s in on) <= 2
    assert {s.attn_order for s in on if s.channel_attn != "none"} == {"channel_first", "spsa_first"}
    assert all(s.attn_order == "channel_first" for s in stages if s.channel_attn == "none")
    assert all(ArchSpec.model_validate(spec.model_dump()) == spec for spec in specs[:5])


def test_uniform_sampler_draws_spsa_switches_only_where_offered() -> None:
    space = load_space(TINY)
    (base,) = supernet_bases(_cfg(), space)
    before = [uniform_sampler(space, base)(random.Random(s)) for s in range(20)]
    switched = load_space({**TINY, "all_stages": {**TINY["all_stages"], "spsa_reverse": [True, False],
                                                  "spsa_similarity": ["correlation", "cosine"]}})
    rng = random.Random(0)
    on = [s for _ in range(300) for s in uniform_sampler(switched, base)(rng).stages if s.spsa]
    assert {s.spsa_reverse for s in on} == {True, False}
    assert {s.spsa_similarity for s in on} == {"correlation", "cosine"}
    assert all(not s.spsa or (s.spsa_reverse and s.spsa_similarity == "correlation")
               for spec in before for s in spec.stages)
    # a single-valued switch draws nothing: the paths are those of the space without it, so the
    # random sequence of older spaces (and a resumed supernet's paths) is unchanged
    fixed = load_space({**TINY, "all_stages": {**TINY["all_stages"], "spsa_reverse": [False]}})
    after = [uniform_sampler(fixed, base)(random.Random(s)) for s in range(20)]
    assert [[s.model_copy(update={"spsa_reverse": True}) for s in spec.stages] for spec in after] == [
        list(spec.stages) for spec in before]
    assert any(not s.spsa_reverse for spec in after for s in spec.stages)


def test_sandwich_extremes_are_the_largest_and_the_smallest_paths() -> None:
    space = load_space({**TINY, "stages": {2: {"channel_attn": ["eca", "se"], "spsa": [True],
                                                  "heads": [1, 2, 4]}}})
    (base,) = supernet_bases(_cfg(), space)
    supernet = Supernet(base, [list(s.choices.channel_attn) for s in space.stage_choices(base.backbone)])
    largest, smallest = sandwich_extremes(space, base, supernet)
    supernet.check_path(largest)
    supernet.check_path(smallest)
    assert [s.channel_attn for s in largest.stages] == ["se"] * 4  # SE has more parameters than ECA
    # SPSA on wherever it may be (stage 4 is 1x1 at 8 px: SPSA forced off), with the most heads
    assert [s.spsa for s in largest.stages] == [True, True, True, False]
    assert [s.spsa_heads for s in largest.stages[:3]] == [2, 4, 2]
    assert largest.stages[0].spsa_alpha == pytest.approx(1.0)  # the geometric centre of [0.5, 2]
    assert [s.channel_attn for s in smallest.stages] == ["none", "eca", "none", "none"]
    assert [s.spsa for s in smallest.stages] == [False, True, False, False]  # s2 must have SPSA
    assert smallest.stages[1].spsa_heads == 1


def test_one_supernet_per_width() -> None:
    bases = supernet_bases(_cfg(), load_space({**TINY, "width": [0.125, 0.25]}))
    assert [(b.backbone, b.width, b.num_classes, b.in_channels) for b in bases] == [
        ("resnet18", 0.125, 10, 1), ("resnet18", 0.25, 10, 1)]


def test_a_space_may_refuse_the_strategy(tmp_path: Path) -> None:
    cfg = _cfg(space={**TINY, "strategies": ["standalone"]})
    with pytest.raises(ValueError, match="strategy: space 'tiny' supports standalone, not 'oneshot'"):
        create_study(cfg, f"sqlite:///{tmp_path / 's.db'}")


def _weights(artifacts: Path, artifact_id: str) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        download_artifact(artifact_store=FileSystemArtifactStore(str(artifacts)), file_path=str(path),
                          artifact_id=artifact_id)
        return load_file(path)


def _check_oneshot_study(study: optuna.Study, artifacts: Path, cfg: SearchConfig) -> None:
    attrs = study.user_attrs
    assert attrs[PHASE_ATTR] == "done"
    (record,) = supernet_records(attrs).values()
    assert record["done"] and record["epoch"] == 2 and [r["epoch"] for r in record["curve"]] == [1, 2]
    trials = study.get_trials(deepcopy=False)
    candidates = [t for t in trials if t.user_attrs.get(ESTIMATE_ATTR)]
    retrained = [t for t in trials if RETRAIN_OF_ATTR in t.user_attrs]
    assert len(candidates) == cfg.trials and all(t.state == TrialState.COMPLETE for t in candidates)
    assert all(t.user_attrs["epochs"] == 0 and t.user_attrs["latency_ms"] > 0 for t in candidates)
    assert len(retrained) == 1 and retrained[0].state == TrialState.COMPLETE
    (retrain,) = retrained
    source = next(t for t in candidates if t.number == retrain.user_attrs[RETRAIN_OF_ATTR])
    assert attrs[RETRAIN_ATTR] == [source.number]
    assert retrain.params == source.params and retrain.user_attrs["spec"] == source.user_attrs["spec"]
    assert retrain.user_attrs["oneshot_val_acc"] == source.user_attrs["val_acc"]
    assert retrain.user_attrs["oneshot_val_loss"] == source.user_attrs["val_loss"]
    # a candidate is ranked by its validation loss (oneshot.estimate "loss", the default): its accuracy
    # objective is exp(-val_loss); val_acc stays its top-1 estimate. A retrained trial has neither.
    assert cfg.oneshot.estimate == "loss"
    for t in candidates:
        assert t.user_attrs["val_loss"] > 0 and 0 <= t.user_attrs["val_acc"] <= 1
        assert t.user_attrs["oneshot_score"] == pytest.approx(math.exp(-t.user_attrs["val_loss"]))
        assert t.values[0] == t.user_attrs["oneshot_score"]
    assert "oneshot_score" not in retrain.user_attrs and retrain.user_attrs["val_loss"] is None
    assert retrain.values[0] == retrain.user_attrs["val_acc"]
    assert retrain.user_attrs[ESTIMATE_ATTR] is False and retrain.user_attrs["epochs"] == cfg.train.epochs
    # candidates are not exported to ONNX (most of their evaluation's cost); the retrained one is
    assert all("onnx_artifact" not in t.user_attrs and "retrained" in t.user_attrs["onnx_skipped"]
               for t in candidates)
    assert "onnx_artifact" in retrain.user_attrs and "onnx_skipped" not in retrain.user_attrs
    # candidates skip the test split (nothing ranks by it); the retrained one is tested
    assert all(t.user_attrs["top1"] is None and t.user_attrs["top5"] is None for t in candidates)
    assert 0 <= retrain.user_attrs["top1"] <= 1 and "oneshot_top1" not in retrain.user_attrs
    estimated = ["val_acc", "val_curve", "val_loss", "oneshot_score"]
    assert estimated_metrics(candidates[0].user_attrs) == estimated
    # the best is the retrained one, even when an estimate is higher
    assert select_best(study).number == retrain.number
    # weight sharing through the engine: a candidate's stored convolutions are the supernet's
    state = load_checkpoint(str(artifacts), record["checkpoint"])
    weights = _weights(artifacts, candidates[0].user_attrs["weights_artifact"])
    torch.testing.assert_close(weights["conv1.weight"], state["model"]["net.conv1.weight"])
    torch.testing.assert_close(weights["layer3.1.conv2.weight"], state["model"]["net.layer3.1.conv2.weight"])
    # ... but its BN statistics are its own (recalibrated for its path)
    key = "layer4.1.bn2.running_mean"
    assert not torch.equal(weights[key], state["model"][f"net.{key}"])


def test_local_oneshot_search_end_to_end(tmp_path: Path) -> None:
    url, artifacts = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "artifacts"
    cfg = _cfg()
    study = create_study(cfg, url)
    report = run_local("os", url, artifact_dir=artifacts)
    assert report.outcome == "done" and report.finished == cfg.trials + 1
    _check_oneshot_study(study, artifacts, cfg)


KILL_AFTER_EPOCH_1 = """
import os, signal, sys
import workers.oneshot as oneshot
from workers.local import run_local

original = oneshot._set_record
def set_record(study, key, record):
    original(study, key, record)
    if record.get("epoch") == 1:  # the epoch's checkpoint is stored: die like an OOM-killed worker
        os.kill(os.getpid(), signal.SIGKILL)
oneshot._set_record = set_record
run_local("os", sys.argv[1], artifact_dir=sys.argv[2])
"""


def test_supernet_training_resumes_after_the_process_was_killed(tmp_path: Path) -> None:
    url, artifacts = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "artifacts"
    cfg = _cfg(retrain_top_k=0, trials=2)
    study = create_study(cfg, url)
    done = subprocess.run([sys.executable, "-c", KILL_AFTER_EPOCH_1, url, str(artifacts)], timeout=600,
                          env={**os.environ, "PYTHONPATH": os.getcwd()}, capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-2000:]
    (killed,) = supernet_records(study.user_attrs).values()
    assert killed["epoch"] == 1 and not killed["done"] and study.user_attrs[PHASE_ATTR] == "supernet"
    report = run_local("os", url, artifact_dir=artifacts)
    assert report.outcome == "done"
    (record,) = supernet_records(study.user_attrs).values()
    assert record["done"] and record["epoch"] == 2
    assert record["curve"][0] == killed["curve"][0]  # epoch 1 was not trained again (same seconds too)
    assert study.user_attrs[PHASE_ATTR] == "done" and study.user_attrs[RETRAIN_ATTR] == []


def test_a_lost_retraining_is_retried_as_a_retraining(tmp_path: Path) -> None:
    from search_spaces.storage import open_storage
    from workers.ray_runner import RunnerOptions, _Run

    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = _cfg()
    study = create_study(cfg, url)
    study.enqueue_trial({"s1.spsa": False}, user_attrs={RETRAIN_OF_ATTR: 0, "oneshot_val_acc": 0.5})
    trial = study.ask()
    trial.suggest_categorical("s1.spsa", [False, True])
    study.tell(trial, state=TrialState.FAIL)  # its worker was lost
    storage = open_storage(url)
    run = _Run(study=study, storage=storage, cfg=cfg, options=RunnerOptions(), run_id="r")
    run.enqueue_retry(study.get_trials(deepcopy=False)[0])
    retry = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))[0]
    assert retry.user_attrs[RETRAIN_OF_ATTR] == 0 and retry.user_attrs["oneshot_val_acc"] == 0.5
    assert retry.user_attrs["retry_of"] == 0 and retry.system_attrs["fixed_params"] == {"s1.spsa": False}
    storage.close()


def test_a_cancel_during_the_supernet_phase_stops_the_run(tmp_path: Path) -> None:
    import threading

    url, artifacts = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "artifacts"
    study = create_study(_cfg(), url)
    stop = threading.Event()
    stop.set()  # asked before the first step
    report = run_local("os", url, artifact_dir=artifacts, stop_event=stop)
    assert report.outcome == "cancelled" and report.ran == 0
    assert study.user_attrs[PHASE_ATTR] == "supernet" and not supernet_records(study.user_attrs)
    assert study.get_trials(deepcopy=False) == []


def test_a_timeout_in_the_supernet_phase_stops_it_checkpointed_and_a_rerun_resumes(tmp_path: Path) -> None:
    url, artifacts = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "artifacts"
    # a timeout no supernet of 50 epochs can meet: the first epoch ends past it
    cfg = _cfg(timeout_s=1e-3, oneshot=OneshotConfig(epochs=50, bn_batches=1),
               train=TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2))
    study = create_study(cfg, url)
    report = run_local("os", url, artifact_dir=artifacts)
    assert report.outcome == "timeout" and report.ran == 0 and report.finished == 0
    (first,) = supernet_records(study.user_attrs).values()
    assert first["epoch"] == 1 and first["epochs"] == 50 and not first["done"]
    assert study.user_attrs[PHASE_ATTR] == "supernet"  # no candidate on a partly trained supernet
    assert study.get_trials(deepcopy=False) == []
    state = load_checkpoint(str(artifacts), first["checkpoint"])
    assert state["epoch"] == 1 and "net.conv1.weight" in state["model"]
    report = run_local("os", url, artifact_dir=artifacts)  # resumes from epoch 1's checkpoint
    assert report.outcome == "timeout"
    (second,) = supernet_records(study.user_attrs).values()
    assert second["epoch"] == 2 and not second["done"] and second["checkpoint"] != first["checkpoint"]
    assert second["curve"][0] == first["curve"][0]  # epoch 1 was not trained again
