"""Detectors from a detection spec: the spec's task/detector fields, the three torchvision detectors
with SPSA in some stages (forward and one training step), classifier weights into the backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from spsa_nas.attention import SPSA
from spsa_nas.detection import build_detector, count_detector, transfer_backbone
from spsa_nas.detection.model import anchor_sizes, backbone_spec
from spsa_nas.models import build_model
from spsa_nas.spec import ArchSpec, StageSpec

SIZE = 64
STAGES = [StageSpec(spsa=True, spsa_heads=2), StageSpec(channel_attn="se"),
          StageSpec(spsa=True, spsa_alpha=2.0, channel_attn="eca"), StageSpec()]


def _spec(name: str, **fields: object) -> ArchSpec:
    base: dict[str, object] = {"backbone": "resnet18", "width": 0.25, "num_classes": 3, "input_size": SIZE,
                               "task": "detection", "detector": {"name": name, "fpn_channels": 16},
                               "stages": STAGES}
    return ArchSpec(**{**base, **fields})  # type: ignore[arg-type]


def _targets(n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        boxes = torch.tensor([[4.0 + i, 6.0, 30.0, 28.0], [34.0, 30.0, 60.0, 58.0 - i]])
        masks = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        out.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    return out


def test_a_classifier_spec_serialises_as_before_and_a_detection_spec_round_trips() -> None:
    plain = ArchSpec.plain("resnet18", num_classes=10)
    assert "task" not in plain.model_dump(mode="json") and "detector" not in plain.model_dump_json()
    assert plain.task == "classification" and plain.detector is None
    spec = _spec("maskrcnn")
    again = ArchSpec.model_validate_json(spec.model_dump_json())
    assert again == spec and again.detector is not None and again.detector.name == "maskrcnn"
    short = ArchSpec.plain("resnet50", task="detection", detector="retinanet")
    assert short.detector is not None and short.detector.fpn_channels == 256
    assert json.loads(short.model_dump_json())["detector"] == {"name": "retinanet", "fpn_channels": 256}


@pytest.mark.parametrize(("fields", "message"), [
    ({"task": "detection", "detector": None}, "detector: a detection spec needs one"),
    ({"task": "classification", "detector": "fasterrcnn"}, "only a spec with task 'detection'"),
    ({"detector": "yolo"}, "detector.name"),
    ({"backbone": "mobilenet_v2", "stages": [StageSpec()] * 7}, "cannot carry a detector"),
])
def test_bad_detection_specs_name_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _spec("fasterrcnn", **fields)


@pytest.mark.parametrize("detector", ["fasterrcnn", "retinanet", "maskrcnn"])
def test_each_detector_with_spsa_predicts_and_takes_a_training_step(detector: str) -> None:
    torch.manual_seed(0)
    model = build_model(_spec(detector))
    assert model.spec.detector.name == detector
    spsa = [m for m in model.backbone.body.modules() if isinstance(m, SPSA)]
    assert len(spsa) == 4  # 2 blocks in each of stages 1 and 3
    model.eval()
    with torch.no_grad():
        outputs = model([torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)])
    expected = {"boxes", "labels", "scores"} | ({"masks"} if detector == "maskrcnn" else set())
    assert len(outputs) == 2 and all(set(o) == expected for o in outputs)
    assert all(torch.isfinite(o["boxes"]).all() for o in outputs)

    model.train()
    weight = model.backbone.body.layer1[0].conv2.weight
    before = weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model([torch.rand(3, SIZE, SIZE) for _ in range(2)], _targets(2))
    if detector == "maskrcnn":
        assert "loss_mask" in losses
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0  # through the SPSA stage
    optimizer.step()
    assert not torch.equal(before, weight)


def test_counting_covers_the_whole_detector() -> None:
    model = build_detector(_spec("fasterrcnn"))
    params, flops, backbone_flops = count_detector(model, model.spec)
    assert params == sum(p.numel() for p in model.parameters())
    assert params > sum(p.numel() for p in model.backbone.parameters()) > 0
    assert flops > backbone_flops > 0


def test_anchors_scale_with_the_input() -> None:
    assert anchor_sizes(128) == (8, 16, 32, 64, 128)
    assert anchor_sizes(800) == (50, 100, 200, 400, 800)


def test_classifier_weights_transfer_into_the_backbone_with_a_report() -> None:
    spec = _spec("fasterrcnn")
    classifier = build_model(backbone_spec(spec).model_copy(update={"num_classes": 10}))
    with torch.no_grad():
        for p in classifier.parameters():
            p.add_(1.0)  # differ from any initialisation
    model = build_detector(spec, backbone_weights=classifier.state_dict())
    report = model.load_report
    assert report is not None and report.mismatched == [] and report.initialised == []
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]
    body = model.backbone.body.state_dict()
    assert sorted(report.loaded) == sorted(body)
    for key in report.loaded:
        assert torch.equal(body[key], classifier.state_dict()[key])
    wider = build_model(backbone_spec(_spec("fasterrcnn", width=0.5)))
    before = {k: v.clone() for k, v in body.items()}
    with pytest.raises(ValueError, match="do not fit the backbone"):
        transfer_backbone(model, wider.state_dict())
    assert all(torch.equal(v, model.backbone.body.state_dict()[k]) for k, v in before.items())


def test_a_saved_detector_rebuilds_and_predicts_the_same(tmp_path: object) -> None:
    torch.manual_seed(1)
    model = build_detector(_spec("retinanet")).eval()
    again = build_model(model.spec, weights=model.state_dict()).eval()
    assert again.load_report is not None and len(again.load_report.loaded) == len(model.state_dict())
    image = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = model(image)[0], again(image)[0]
    assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["boxes"], b["boxes"])


def test_build_detector_refuses_a_classifier_spec() -> None:
    with pytest.raises(ValueError, match="not a detection spec"):
        build_detector(ArchSpec.plain("resnet18"))


def test_a_classification_searchs_weights_file_transfers_by_path(tmp_path: Path) -> None:
    # a classification search's `best/weights` download is a safetensors file of a classifier; a
    # plain one (no attention) transfers into an SPSA detector: the attention keeps its init
    from safetensors.torch import save_file

    spec = _spec("fasterrcnn")
    plain = build_model(ArchSpec.plain("resnet18", width=0.25, num_classes=10, input_size=SIZE))
    path = tmp_path / "best.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    model = build_detector(spec, backbone_weights=path)
    report = model.load_report
    assert report is not None and report.mismatched == [] and report.loaded and report.initialised
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]
    body = model.backbone.body.state_dict()
    assert sorted(report.loaded + report.initialised) == sorted(body)
    assert all(k in plain.state_dict() for k in report.loaded)
    assert all(k not in plain.state_dict() for k in report.initialised)
    assert all(torch.equal(body[k], plain.state_dict()[k]) for k in report.loaded)
