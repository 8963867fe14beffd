"""Tests of spsa_nas.evaluate: one trial end to end, the latency cache and lock, budget, hooks."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig
from spsa_nas.counting import count_params
from spsa_nas.data import DataError, load_data
from spsa_nas.evaluate import Cancelled, EvalHooks, Measurement, TrialResult, evaluate_spec
from spsa_nas.latency import LatencyResult
from spsa_nas.models import build_model
from spsa_nas.spec import ArchSpec, StageSpec
from spsa_nas.train import evaluate_accuracy

# the trial user attrs of docs/CONTRACTS.md that a TrialResult fills
METRIC_KEYS = {"params", "flops", "latency", "latency_ms", "feasible", "val_curve", "val_acc", "val_loss",
               "top1", "top5", "epochs", "train_seconds", "device", "spec"}
FAST_LATENCY = LatencyConfig(warmup=1, repeats=3, threads=1, protocol="simple")  # the quick protocol
SYNTHETIC = DataConfig(name="synthetic", synthetic_samples=96, synthetic_classes=4, synthetic_size=16)


def _spec(num_classes: int = 10, in_channels: int = 1, input_size: int = 16) -> ArchSpec:
    return ArchSpec(
        backbone="resnet18", width=0.25, stem="cifar", input_size=input_size, num_classes=num_classes,
        in_channels=in_channels,
        stages=[StageSpec(), StageSpec(spsa=True, channel_attn="se"),
                StageSpec(spsa=True, spsa_heads=2, spsa_alpha=2.0, channel_attn="se"), StageSpec()],
    )


class DictCache:
    """A real key-value latency cache backed by a dict, counting its traffic."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}
        self.gets = 0
        self.puts = 0

    def get(self, key: str) -> dict[str, Any] | None:
        self.gets += 1
        record = self.data.get(key)
        return json.loads(json.dumps(record)) if record is not None else None  # as a store would

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.puts += 1
        self.data[key] = value


class CountingLock:
    """A latency lock that counts how often a measurement took the device."""

    def __init__(self) -> None:
        self.entered = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.entered += 1
        yield


def test_digits_end_to_end() -> None:
    spec = _spec()
    epochs: list[tuple[int, float]] = []
    measured: list[Measurement] = []
    hooks = EvalHooks(on_epoch=lambda e, acc: epochs.append((e, acc)), on_measured=measured.append)
    train = TrainConfig(epochs=2, batch_size=16, max_steps_per_epoch=30, seed=1)
    result = evaluate_spec(spec, data=DataConfig(name="digits"), train=train, latency=FAST_LATENCY,
                           device="cpu", latency_budget_ms=1e6, hooks=hooks)
    assert isinstance(result, TrialResult) and result.feasible
    assert [e for e, _ in epochs] == [1, 2] and [acc for _, acc in epochs] == result.val_curve
    assert result.epochs == 2 and result.val_acc == result.val_curve[-1]
    assert result.top1 is not None and result.top1 > 0.3, result.metrics()  # chance: 0.1
    assert result.top5 is not None and result.top5 >= result.top1
    assert len(measured) == 1 and not measured[0].cached and measured[0].latency == result.latency
    assert result.params == measured[0].params == count_params(build_model(spec))
    assert result.flops > 0 and result.latency.input_shape == (1, 1, 16, 16)
    assert result.train_seconds > 0 and result.device == "cpu"
    model = result.model
    assert model is not None and not model.training and model.spec == spec
    assert all(p.device.type == "cpu" for p in model.parameters())
    # the returned model is the one that scored: its test accuracy is the reported top-1
    splits = load_data(DataConfig(name="digits"), 16, 1)
    assert evaluate_accuracy(model, splits.test, "cpu")[1] == result.top1
    metrics = json.loads(json.dumps(result.metrics()))
    assert set(metrics) == METRIC_KEYS
    assert metrics["val_loss"] is None  # trained standalone: only a one-shot fit measures it
    assert metrics["latency_ms"] == result.latency.median_ms
    assert metrics["spec"] == spec.model_dump(mode="json")
    assert ArchSpec.model_validate(metrics["spec"]) == spec


def test_identical_architectures_are_measured_once() -> None:
    cache, lock = DictCache(), CountingLock()
    seen: list[Measurement] = []
    hooks = EvalHooks(latency_cache=cache, latency_lock=lock, on_measured=seen.append)
    spec = _spec(num_classes=4, in_channels=3)
    run = dict(data=SYNTHETIC, train=TrainConfig(), device="cpu", latency_budget_ms=1e-9, hooks=hooks)
    first = evaluate_spec(spec, latency=FAST_LATENCY, **run)
    second = evaluate_spec(spec, latency=FAST_LATENCY, **run)
    assert [m.cached for m in seen] == [False, True]
    assert lock.entered == 1 and cache.puts == 1 and len(cache.data) == 1
    assert second.latency == first.latency
    # another protocol (batch 2) is another measurement
    evaluate_spec(spec, latency=FAST_LATENCY.model_copy(update={"batch_size": 2}), **run)
    assert seen[-1].cached is False and lock.entered == 2 and len(cache.data) == 2
    assert seen[-1].latency.batch_size == 2


def test_measured_by_another_worker_while_waiting_for_the_lock() -> None:
    planted = LatencyResult(123.0, 130.0, 124.0, 1.0, 2.0, 120.0, 140.0, 30, 5, 1, (1, 3, 16, 16), "cpu",
                            "elsewhere", 1, torch.__version__)

    class Racing(DictCache):
        """Empty at the first look; the other worker's figure is there by the look inside the lock."""

        def get(self, key: str) -> dict[str, Any] | None:
            if self.gets == 1:
                self.data[key] = planted.to_dict()
            return super().get(key)

    cache, lock = Racing(), CountingLock()
    seen: list[Measurement] = []
    result = evaluate_spec(_spec(num_classes=4, in_channels=3), data=SYNTHETIC, train=TrainConfig(),
                           latency=FAST_LATENCY, device="cpu", latency_budget_ms=1e-9,
                           hooks=EvalHooks(latency_cache=cache, latency_lock=lock, on_measured=seen.append))
    assert lock.entered == 1 and cache.gets == 2
    assert seen[0].cached and result.latency == planted and cache.puts == 0


def test_an_unreadable_cache_record_is_measured_afresh() -> None:
    class Stale(DictCache):
        def get(self, key: str) -> dict[str, Any] | None:
            return {"median_ms": 1.0}  # a record of some other protocol version

    cache = Stale()
    seen: list[Measurement] = []
    evaluate_spec(_spec(num_classes=4, in_channels=3), data=SYNTHETIC, train=TrainConfig(),
                  latency=FAST_LATENCY, device="cpu", latency_budget_ms=1e-9,
                  hooks=EvalHooks(latency_cache=cache, on_measured=seen.append))
    assert not seen[0].cached and cache.puts == 1 and seen[0].latency.repeats == 3


def test_over_budget_is_infeasible_without_loading_data(tmp_path: Path) -> None:
    # CIFAR-10 under an empty data root: loading it raises, so a feasible trial would fail
    data = DataConfig(name="cifar10", data_root=str(tmp_path))
    spec = _spec(num_classes=10, in_channels=3)
    epochs: list[int] = []
    result = evaluate_spec(spec, data=data, train=TrainConfig(), latency=FAST_LATENCY, device="cpu",
                           latency_budget_ms=1e-6, hooks=EvalHooks(on_epoch=lambda e, a: epochs.append(e)))
    assert not result.feasible and result.model is None and epochs == []
    assert result.val_curve == [] and result.val_acc is None and result.top1 is None and result.epochs == 0
    metrics = json.loads(json.dumps(result.metrics()))
    assert metrics["feasible"] is False and metrics["latency_ms"] > 1e-6 and set(metrics) == METRIC_KEYS
    with pytest.raises(DataError, match="download: true"):  # the control: within budget it loads
        evaluate_spec(spec, data=data, train=TrainConfig(), latency=FAST_LATENCY, device="cpu",
                      latency_budget_ms=1e6)


@pytest.mark.parametrize(("classes", "channels", "field"), [(5, 1, "num_classes"), (10, 3, "in_channels")])
def test_spec_must_fit_the_dataset_before_anything_is_measured(classes: int, channels: int,
                                                                field: str) -> None:
    lock = CountingLock()
    seen: list[Measurement] = []
    with pytest.raises(ValueError, match=f"spec.{field}"):
        evaluate_spec(_spec(num_classes=classes, in_channels=channels), data=DataConfig(name="digits"),
                      train=TrainConfig(), latency=FAST_LATENCY, device="cpu",
                      hooks=EvalHooks(latency_lock=lock, on_measured=seen.append))
    assert lock.entered == 0 and seen == []


def test_on_epoch_exception_propagates() -> None:
    class PrunedError(Exception):
        pass

    epochs: list[int] = []

    def on_epoch(epoch: int, acc: float) -> None:
        epochs.append(epoch)
        if epoch == 2:
            raise PrunedError("pruned")

    train = TrainConfig(epochs=3, batch_size=8, max_steps_per_epoch=2, image_size=8)
    with pytest.raises(PrunedError):
        evaluate_spec(_spec(num_classes=4, in_channels=3), data=SYNTHETIC, train=train,
                      latency=FAST_LATENCY, device="cpu", hooks=EvalHooks(on_epoch=on_epoch))
    assert epochs == [1, 2]


def test_should_stop_cancels() -> None:
    polls: list[int] = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 3

    train = TrainConfig(epochs=3, batch_size=8, max_steps_per_epoch=2, image_size=8)
    with pytest.raises(Cancelled):
        evaluate_spec(_spec(num_classes=4, in_channels=3), data=SYNTHETIC, train=train,
                      latency=FAST_LATENCY, device="cpu", hooks=EvalHooks(should_stop=should_stop))
    assert len(polls) == 4  # one poll before training, then one per step until the fourth says stop


def test_trials_are_reproducible_and_train_at_their_own_image_size() -> None:
    train = TrainConfig(epochs=1, batch_size=8, max_steps_per_epoch=3, image_size=8, seed=2)
    runs = [evaluate_spec(_spec(num_classes=4, in_channels=3), data=SYNTHETIC, train=train,
                          latency=FAST_LATENCY, device="cpu") for _ in range(2)]
    a, b = (r.model for r in runs)
    assert a is not None and b is not None
    assert runs[0].val_curve == runs[1].val_curve and runs[0].top1 == runs[1].top1
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                 strict=True))
    assert runs[0].latency.input_shape == (1, 3, 16, 16)  # latency at the spec's size, training at 8
