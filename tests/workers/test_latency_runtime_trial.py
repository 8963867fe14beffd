"""latency.runtime through the CLI and a real trial: --latency-runtime, a clear error for a bad
value, and an onnxruntime trial whose downloadable ONNX is the graph it measured."""

from __future__ import annotations

import argparse
from pathlib import Path

import onnxruntime
import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.trial import TrialState

from search_spaces.config import ObjectiveConfig, SearchConfig
from search_spaces.loading import load_space
from search_spaces.study import create_study
from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig
from spsa_nas.export import onnx_graph_sha256
from workers.cli import UsageError, search
from workers.cli.config_flags import build_config, config_values
from workers.trial import run_trial

BASE = ["search", "--space", "quick", "--dataset", "digits"]
TINY = {"name": "tiny", "backbone": "resnet18", "stem": "cifar", "input_size": 8, "width": 0.25,
        "all_stages": {"spsa": [True], "heads": [1], "channel_attn": ["none"]}}
QUICK_LATENCY = {"repeats": 3, "warmup": 1, "blocks": 4, "max_time_s": 0.3, "max_warmup_s": 0.2}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spsa-nas")
    search.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _config(*flags: str) -> SearchConfig:
    args = _parser().parse_args([*BASE, *flags])
    return build_config({**config_values(args), "space": "quick", "study_name": "s"})


def test_the_cli_sets_the_runtime() -> None:
    assert _config().latency.runtime == "eager"
    assert _config("--latency-runtime", "onnxruntime").latency.runtime == "onnxruntime"
    assert _config("--latency.runtime", "compiled").latency.runtime == "compiled"


def test_a_bad_runtime_is_a_clear_cli_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args([*BASE, "--latency-runtime", "tensorrt"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --latency-runtime/--latency.runtime: invalid choice: 'tensorrt'" in err
    with pytest.raises(UsageError, match="channels_last applies to the eager and compiled"):
        _config("--latency-runtime", "onnxruntime", "--latency.channels-last")
    with pytest.raises(UsageError, match="cannot measure a detector"):
        _config("--dataset", "shapes", "--latency-runtime", "compiled")


@pytest.mark.slow
def test_an_onnxruntime_trial_downloads_the_graph_it_measured(tmp_path: Path) -> None:
    cfg = SearchConfig(study_name="rt", space=TINY, dataset=DataConfig(name="digits", train_subset=96),
                       trials=2, train=TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2),
                       latency=LatencyConfig(runtime="onnxruntime", **QUICK_LATENCY), device="cpu",
                       objective=ObjectiveConfig(latency_budget_ms=1e6))
    study = create_study(cfg, f"sqlite:///{tmp_path}/study.db")
    store = FileSystemArtifactStore(str(tmp_path))
    frozen = run_trial(study, study.ask(), cfg, load_space(TINY), artifact_store=store)
    assert frozen.state == TrialState.COMPLETE, frozen.user_attrs.get("traceback")
    attrs = frozen.user_attrs
    latency = attrs["latency"]
    assert latency["runtime"] == "onnxruntime" and latency["runtime_version"] == onnxruntime.__version__
    assert attrs["latency_runtime"] == f"onnxruntime {onnxruntime.__version__}"
    assert "onnx_error" not in attrs, attrs.get("onnx_error")
    onnx_file = tmp_path / "model.onnx"
    download_artifact(artifact_store=store, file_path=str(onnx_file), artifact_id=attrs["onnx_artifact"])
    # the trained model's file is the graph measured before training (weights aside)
    assert onnx_graph_sha256(onnx_file) == latency["onnx_graph_sha256"] == attrs["onnx_graph_sha256"]
    # a second trial of the same architecture reuses the figure: exported for latency once
    again = run_trial(study, study.ask(), cfg, load_space(TINY), artifact_store=store)
    assert again.state == TrialState.COMPLETE and again.user_attrs["latency_cached"] is True
    # the study's anchor is the onnxruntime reference's: runtimes never share one
    anchors = [k for k in study.user_attrs if k.startswith("spsa_nas:latency_anchor:")]
    assert len(anchors) == 1 and "onnxruntime" in study.user_attrs[anchors[0]]["reference"]
    optuna.delete_study(study_name="rt", storage=f"sqlite:///{tmp_path}/study.db")
