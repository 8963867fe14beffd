"""Tests of spsa_nas.train: schedule, optimiser groups, training loop, hooks, failures, accuracy."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from spsa_nas.config import DataConfig, TrainConfig
from spsa_nas.data import load_data
from spsa_nas.train import (
    Cancelled,
    NonFiniteLossError,
    choose_precision,
    evaluate_accuracy,
    evaluate_loss_and_accuracy,
    lr_at,
    make_optimizer,
    train_model,
)


def _tiny(classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


@pytest.fixture(scope="module")
def synthetic() -> tuple[TensorDataset, TensorDataset]:
    splits = load_data(DataConfig(name="synthetic", synthetic_samples=128, seed=1), 8, 3)
    return splits.train, splits.val  # type: ignore[return-value]


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    lrs = [lr_at(step, 100, 10, 0.1) for step in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.05)
    assert lr_at(100, 100, 10, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, 50, 0, 0.2) == pytest.approx(0.2)
    assert lr_at(25, 50, 0, 0.2) == pytest.approx(0.1 * (1 + math.cos(math.pi / 2)))


def test_weight_decay_spares_norms_and_biases() -> None:
    model = _tiny()
    optimizer = make_optimizer(model, TrainConfig(weight_decay=1e-3, momentum=0.9))
    decayed, spared = optimizer.param_groups
    assert decayed["weight_decay"] == 1e-3 and spared["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in spared["params"])
    assert decayed["momentum"] == 0.9
    assert len(decayed["params"]) + len(spared["params"]) == len(list(model.parameters()))


def test_precision_choice() -> None:
    cpu = torch.device("cpu")
    assert choose_precision("auto", cpu).dtype is None
    assert choose_precision("off", cpu).dtype is None
    assert choose_precision("on", cpu).dtype == torch.bfloat16
    if torch.cuda.is_available():
        chosen = choose_precision("auto", torch.device("cuda"))
        assert chosen.dtype in (torch.bfloat16, torch.float16)
        assert chosen.scaler == (chosen.dtype == torch.float16)


def test_training_reports_each_epoch_and_is_deterministic(synthetic: tuple) -> None:
    train, val = synthetic
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _tiny()
        seen: list[tuple[int, float]] = []
        report = train_model(model, train, val, TrainConfig(epochs=2, batch_size=16, seed=3), "cpu",
                             on_epoch=lambda e, acc, seen=seen: seen.append((e, acc)))
        runs.append((report, seen, [p.detach().clone() for p in model.parameters()]))
    (report, seen, weights), (report2, _, weights2) = runs
    assert [e for e, _ in seen] == [1, 2]
    assert [acc for _, acc in seen] == report.val_curve
    assert all(0.0 <= acc <= 1.0 for acc in report.val_curve)
    assert report.epochs == 2 and report.steps == 2 * (len(train) // 16)
    assert report.val_curve == report2.val_curve
    assert all(torch.equal(a, b) for a, b in zip(weights, weights2, strict=True))
    # a different shuffling seed trains different weights
    torch.manual_seed(0)
    other = _tiny()
    train_model(other, train, val, TrainConfig(epochs=2, batch_size=16, seed=4), "cpu")
    assert not all(torch.equal(a, b) for a, b in zip(weights, other.parameters(), strict=True))


def test_max_steps_per_epoch(synthetic: tuple) -> None:
    train, val = synthetic
    report = train_model(_tiny(), train, val, TrainConfig(epochs=3, batch_size=8, max_steps_per_epoch=2),
                         "cpu")
    assert report.steps == 6 and report.epochs == 3


def test_on_epoch_exception_propagates_and_stops(synthetic: tuple) -> None:
    train, val = synthetic

    class PrunedError(Exception):
        pass

    epochs: list[int] = []

    def on_epoch(epoch: int, acc: float) -> None:
        epochs.append(epoch)
        raise PrunedError(f"pruned at {epoch}")

    with pytest.raises(PrunedError, match="pruned at 1"):
        train_model(_tiny(), train, val, TrainConfig(epochs=3, batch_size=16), "cpu", on_epoch=on_epoch)
    assert epochs == [1]


def test_should_stop_cancels_between_steps(synthetic: tuple) -> None:
    train, val = synthetic
    polls: list[int] = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(Cancelled, match="step 3"):
        train_model(_tiny(), train, val, TrainConfig(epochs=2, batch_size=8), "cpu", should_stop=should_stop)
    assert len(polls) == 3


def test_non_finite_loss_fails_the_trial(synthetic: tuple) -> None:
    train, val = synthetic
    model = _tiny()
    with torch.no_grad():
        model[-1].weight.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1"):
        train_model(model, train, val, TrainConfig(epochs=1, batch_size=16), "cpu")


def test_amp_on_cpu_and_channels_last_train(synthetic: tuple) -> None:
    train, val = synthetic
    model = _tiny()
    cfg = TrainConfig(epochs=1, batch_size=16, amp="on", channels_last=True)
    report = train_model(model, train, val, cfg, "cpu")
    assert len(report.val_curve) == 1 and 0.0 <= report.val_curve[0] <= 1.0
    assert model[0].weight.is_contiguous()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_empty_training_set_is_an_error(synthetic: tuple) -> None:
    _, val = synthetic
    empty = TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="train has 0"):
        train_model(_tiny(), empty, val, TrainConfig(), "cpu")


def test_evaluate_accuracy_counts_exactly() -> None:
    # the "images" are the logits themselves: the accuracy is known by construction
    logits = torch.tensor([
        [9.0, 1, 2, 3, 4, 5, 6, 7],  # label 0: top-1 hit
        [1.0, 9, 2, 3, 4, 5, 6, 7],  # label 2: rank 7 -> miss top-5
        [1.0, 2, 9, 3, 4, 5, 6, 7],  # label 7: rank 2 -> top-5 hit
        [7.0, 6, 5, 4, 3, 2, 1, 0],  # label 4: rank 5 -> top-5 hit
    ])
    labels = torch.tensor([0, 2, 7, 4])
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.9))
    model.train()
    acc = evaluate_accuracy(model, TensorDataset(logits, labels), "cpu", topk=(1, 5), batch_size=3)
    assert acc == {1: 0.25, 5: 0.75}
    assert model.training and model[1].training
    few = evaluate_accuracy(nn.Flatten(), TensorDataset(logits[:, :4], torch.tensor([0, 1, 2, 3])), "cpu")
    assert few[5] is None and few[1] == 0.75
    with pytest.raises(ValueError, match="empty"):
        evaluate_accuracy(nn.Flatten(), TensorDataset(logits[:0], labels[:0]), "cpu")


def test_loss_and_accuracy_in_one_pass_are_exact() -> None:
    # the "images" are the logits: accuracy and mean cross-entropy are known by construction
    logits = torch.tensor([[4.0, 0, 0], [0, 1, 0], [2, 0, 3], [0, 0, 0], [1, 5, 0]])
    labels = torch.tensor([0, 1, 0, 2, 1])
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.9))
    model.train()
    acc, loss = evaluate_loss_and_accuracy(model, TensorDataset(logits, labels), "cpu", batch_size=2)
    assert acc == pytest.approx(3 / 5)  # rows 0, 1, 4 (row 3's tie goes to class 0)
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, labels)))
    assert model.training and model[1].training  # the training flags are restored
    assert acc == evaluate_accuracy(model, TensorDataset(logits, labels), "cpu", topk=(1,))[1]


def test_loader_workers_give_the_same_training(synthetic: tuple) -> None:
    train, val = synthetic
    weights = []
    for workers in (0, 1):
        torch.manual_seed(0)
        model = _tiny()
        train_model(model, train, val, TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=3,
                                                   num_workers=workers), "cpu")
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
