"""The detection path of run_trial: a detection space on the shapes data through real SQLite storage,
a real artifact store and real (tiny) training; the stored weights and ONNX rebuild the detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.trial import TrialState

from search_spaces.config import SearchConfig
from search_spaces.loading import load_space
from search_spaces.study import create_study, select_best
from spsa_nas import build_model
from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig
from spsa_nas.export import SPEC_METADATA_KEY
from spsa_nas.spec import ArchSpec
from workers.trial import run_trial

pytestmark = pytest.mark.slow

SPACE = {
    "name": "det-tiny",
    "task": "detection",
    "detector": "fasterrcnn",
    "fpn_channels": 16,
    "backbone": "resnet18",
    "input_size": 64,
    "width": 0.25,
    "all_stages": {"spsa": [True], "heads": [2], "channel_attn": ["none"]},
}


def _cfg(tmp_path: Path, **update: object) -> SearchConfig:
    base = SearchConfig(
        study_name="det",
        space=SPACE,
        dataset=DataConfig(name="shapes", data_root=str(tmp_path / "data"), shapes_images=16, shapes_size=64),
        trials=1,
        train=TrainConfig(epochs=1, batch_size=4, lr=0.01, max_steps_per_epoch=2),
        latency=LatencyConfig(repeats=3, warmup=1, blocks=4, max_time_s=1, max_warmup_s=0.5),
        device="cpu",
    )
    return base.model_copy(update=update)


def test_a_detection_trial_completes_with_map_as_accuracy_and_its_downloads_rebuild(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    study = create_study(cfg, f"sqlite:///{tmp_path}/study.db")
    assert study.metric_names == ["validation box AP", "latency (ms)"]  # optuna-dashboard's labels
    (tmp_path / "artifacts").mkdir()
    store = FileSystemArtifactStore(str(tmp_path / "artifacts"))
    frozen = run_trial(study, study.ask(), cfg, load_space(SPACE), artifact_store=store)
    assert frozen.state == TrialState.COMPLETE, frozen.user_attrs.get("traceback")
    attrs = frozen.user_attrs
    for key in ("ap", "ap50", "ap75", "aps", "apm", "apl", "params", "flops", "backbone_flops", "latency_ms"):
        assert key in attrs, key
    assert attrs["task"] == "detection" and attrs["top1"] is None
    assert frozen.values == [attrs["val_acc"], attrs["latency_ms"]] and 0.0 <= attrs["val_acc"] <= 1.0
    assert attrs["flops"] > attrs["backbone_flops"] > 0
    assert select_best(study).number == frozen.number
    spec = ArchSpec.model_validate(attrs["spec"])
    assert spec.task == "detection" and spec.num_classes == 4 and spec.detector.fpn_channels == 16

    weights = tmp_path / "w.safetensors"
    download_artifact(artifact_store=store, file_path=str(weights), artifact_id=attrs["weights_artifact"])
    model = build_model(spec, weights=weights).eval()
    assert not model.load_report.initialised and not model.load_report.mismatched
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        prediction = model(image)[0]
    assert set(prediction) == {"boxes", "labels", "scores"}

    assert "onnx_error" not in attrs, attrs.get("onnx_error")
    onnx_path = tmp_path / "m.onnx"
    download_artifact(artifact_store=store, file_path=str(onnx_path), artifact_id=attrs["onnx_artifact"])
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert ArchSpec.model_validate_json(meta[SPEC_METADATA_KEY]) == spec
    boxes, labels, scores = ort.InferenceSession(str(onnx_path)).run(None, {"images": image.numpy()})
    assert len(boxes) > 0 and boxes.shape == tuple(prediction["boxes"].shape)
    assert labels.tolist() == prediction["labels"].tolist()
    np.testing.assert_allclose(scores, prediction["scores"].numpy(), atol=1e-4)


def test_a_detection_space_refuses_classification_data_and_the_reverse(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/study.db"
    with pytest.raises(ValueError, match="is a detection space but 'digits' is classification data"):
        create_study(_cfg(tmp_path, dataset=DataConfig(name="digits")), url)
    with pytest.raises(ValueError, match="is a classification space but 'shapes' is detection data"):
        create_study(_cfg(tmp_path, study_name="c", space="quick"), url)
