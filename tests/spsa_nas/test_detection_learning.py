"""The detection recipe learns: a short, seeded training of a tiny Faster R-CNN on the shapes data
lowers its loss and lifts its box AP above the untrained detector's on the same held-out images
(about 135 steps at 48 px: ~10 s on an idle 2-core CPU with one thread, ~40 s under load 8)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spsa_nas.config import DataConfig, TrainConfig
from spsa_nas.detection import build_detector, load_detection_data, train_detector
from spsa_nas.detection.train import evaluate_detector
from spsa_nas.spec import ArchSpec

pytestmark = pytest.mark.slow

SIZE = 48


def test_a_short_training_lifts_ap_above_the_untrained_detectors(tmp_path: Path) -> None:
    data = DataConfig(name="shapes", data_root=str(tmp_path), shapes_images=64, shapes_size=SIZE,
                      shapes_categories=1, val_fraction=0.2)
    splits = load_detection_data(data, masks=False)
    spec = ArchSpec.plain("resnet18", width=0.25, num_classes=splits.num_classes, input_size=SIZE,
                          task="detection", detector={"name": "fasterrcnn", "fpn_channels": 16})
    torch.manual_seed(0)
    model = build_detector(spec)
    before = evaluate_detector(model, splits.val, "cpu")
    losses: list[float] = []
    hook = model.register_forward_hook(
        lambda _m, _i, out: losses.append(float(sum(out.values()).detach())) if model.training else None)
    cfg = TrainConfig(epochs=15, batch_size=4, lr=0.02, warmup_epochs=1, weight_decay=1e-4, seed=0)
    report = train_detector(model, splits.train, splits.val, cfg, "cpu")
    hook.remove()
    after = evaluate_detector(model, splits.val, "cpu")
    assert report.steps == len(losses) > 100
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, losses
    # true positives on images it never trained on: AP and AP50 well above the untrained model's
    assert after["ap50"] > before["ap50"] + 0.1 and after["ap"] > before["ap"] + 0.02, (before, after)
    assert len(report.val_curve) == 15 and report.val_curve[-1] == after["ap"]
