"""load_weights / build_model(weights=...): state_dicts and files, the report, bad files."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from spsa_nas.models import LoadReport, build_model, load_state_dict_file, load_weights
from spsa_nas.spec import ArchSpec, StageSpec


def _hybrid_spec(**fields: object) -> ArchSpec:
    stages = [StageSpec(spsa=True, channel_attn="se"), StageSpec(), StageSpec(channel_attn="eca"),
              StageSpec(spsa=True, spsa_heads=4)]
    return ArchSpec(backbone="resnet18", stages=stages, **fields)  # type: ignore[arg-type]


def test_torchvision_weights_load_into_a_hybrid_and_attention_is_reported(
        caplog: pytest.LogCaptureFixture) -> None:
    plain = torchvision.models.resnet18(weights=None)
    with caplog.at_level(logging.INFO, logger="spsa_nas.models.weights"):
        model = build_model(_hybrid_spec(), weights=plain.state_dict())
    report = model.load_report
    assert isinstance(report, LoadReport)
    own = model.state_dict()
    attention = [k for k in own if ".attn." in k]
    assert attention and sorted(report.initialised) == sorted(attention)
    assert sorted(report.loaded) == sorted(plain.state_dict())
    assert report.unexpected == [] and report.mismatched == []
    for key in report.loaded:
        assert torch.equal(own[key], plain.state_dict()[key])
    message = "\n".join(r.getMessage() for r in caplog.records)
    assert all(k in message for k in attention)


def test_mismatched_and_unexpected_tensors_are_reported_and_left_alone() -> None:
    plain = torchvision.models.resnet18(weights=None).state_dict()
    plain["extra.weight"] = torch.zeros(3)
    model = build_model(ArchSpec.plain("resnet18", num_classes=10))
    fc_before = model.fc.weight.detach().clone()
    report = load_weights(model, plain)
    assert sorted(report.mismatched) == ["fc.bias", "fc.weight"]
    assert report.unexpected == ["extra.weight"]
    assert report.initialised == []
    assert torch.equal(model.fc.weight, fc_before)
    assert torch.equal(model.conv1.weight, plain["conv1.weight"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_from_files(tmp_path: Path, suffix: str) -> None:
    spec = ArchSpec.plain("resnet18", width=0.25, stem="cifar", input_size=16)
    source = build_model(spec).eval()
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    assert load_state_dict_file(path).keys() == state.keys()
    model = build_model(spec, weights=str(path)).eval()
    assert len(model.load_report.loaded) == len(state)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_bad_weight_files_name_the_path_and_the_problem(tmp_path: Path) -> None:
    spec = ArchSpec.plain("resnet18", width=0.25)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ValueError, match=r"nope\.safetensors: no such file"):
        build_model(spec, weights=missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match=r"garbage\.safetensors: not a readable safetensors"):
        build_model(spec, weights=garbage)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pt: not a torch file"):
        build_model(spec, weights=junk)
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(ValueError, match=r"list\.pt: expected a state_dict.*got list"):
        build_model(spec, weights=listing)
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "epoch": 3}, checkpoint)
    with pytest.raises(ValueError, match=r"ckpt\.pt: .*training checkpoint"):
        build_model(spec, weights=checkpoint)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "obj": datetime.date(2020, 1, 1)}, path)
    with pytest.raises(ValueError, match=r"evil\.pt: not a torch file loadable with weights_only"):
        load_state_dict_file(path)
