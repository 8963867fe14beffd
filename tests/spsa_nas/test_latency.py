"""Tests of spsa_nas.latency: the measurement protocol, its result record and the cache key."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from spsa_nas.config import LatencyConfig
from spsa_nas.latency import LatencyResult, latency_key, measure_latency, resolve_device
from spsa_nas.spec import ArchSpec, StageSpec

CONTRACT_FIELDS = {"median_ms", "p90_ms", "mean_ms", "std_ms", "iqr_ms", "min_ms", "max_ms", "repeats",
                   "warmup", "batch_size", "input_shape", "device", "device_name", "threads",
                   "torch_version"}


class Recorder(nn.Module):
    """Records, at each forward, whether it ran in training mode and under inference mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        self.seen: list[tuple[bool, bool, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.is_inference_mode_enabled(), x.shape[0]))
        return self.head(self.bn(self.conv(x)).mean(dim=(2, 3)))


def test_measure_latency_protocol_and_fields() -> None:
    model = Recorder()
    model.train()
    model.bn.eval()  # a mixed state must come back exactly
    cfg = LatencyConfig(batch_size=2, warmup=3, repeats=7)
    result = measure_latency(model, (3, 16, 16), cfg, "cpu")
    assert len(model.seen) == 3 + 7
    assert all(not training and inference and batch == 2 for training, inference, batch in model.seen)
    assert model.training and model.conv.training and not model.bn.training
    assert result.repeats == 7 and result.warmup == 3 and result.batch_size == 2
    assert result.input_shape == (2, 3, 16, 16)
    assert 0 < result.min_ms <= result.median_ms <= result.p90_ms <= result.max_ms
    assert result.min_ms <= result.mean_ms <= result.max_ms
    spread = result.max_ms - result.min_ms  # the exact figures: test_statistics_are_those_of_the_timed_calls
    assert 0 <= result.iqr_ms <= spread and 0 <= result.std_ms <= spread
    assert result.device == "cpu" and result.device_name and result.torch_version == torch.__version__
    assert result.threads == torch.get_num_threads()


def test_statistics_are_those_of_the_timed_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a clock whose timed calls take 1..7 ms (shuffled), every figure is known exactly."""
    import spsa_nas.latency as latency_module

    durations_ns = [4_000_000, 1_000_000, 7_000_000, 2_000_000, 6_000_000, 3_000_000, 5_000_000]
    readings: list[int] = []
    for duration in durations_ns:  # each timed call reads the clock before and after
        start = 10_000_000 * len(readings)
        readings += [start, start + duration]
    clock = iter(readings)
    monkeypatch.setattr(latency_module.time, "perf_counter_ns", lambda: next(clock))
    cfg = LatencyConfig(warmup=1, repeats=7, min_time_s=0.0)
    result = measure_latency(nn.Conv2d(1, 2, 3), (1, 8, 8), cfg, "cpu")
    assert next(clock, None) is None  # every reading was taken: 7 timed calls, no more
    ms = np.arange(1.0, 8.0)
    assert result.repeats == 7
    assert (result.min_ms, result.median_ms, result.max_ms, result.mean_ms) == (1.0, 4.0, 7.0, 4.0)
    assert result.p90_ms == pytest.approx(6.4)  # numpy's linear percentile of 1..7
    assert result.iqr_ms == pytest.approx(5.5 - 2.5)
    assert result.std_ms == pytest.approx(float(ms.std(ddof=1)))  # sample std: 2.16, not 2.0


def test_result_record_round_trips_through_json() -> None:
    result = measure_latency(nn.Conv2d(1, 2, 3), (1, 8, 8), LatencyConfig(warmup=0, repeats=3), "cpu")
    record = json.loads(json.dumps(result.to_dict()))
    assert set(record) == CONTRACT_FIELDS
    assert LatencyResult.from_dict(record) == result
    with pytest.raises(ValueError, match="fields"):
        LatencyResult.from_dict({**record, "extra": 1})


def test_threads_are_set_for_the_measurement_and_restored() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = measure_latency(nn.Conv2d(3, 3, 3), (3, 8, 8), LatencyConfig(threads=1, repeats=3), "cpu")
        assert result.threads == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_min_time_keeps_repeating() -> None:
    model = nn.Linear(4, 4)
    result = measure_latency(model, (1, 1, 4), LatencyConfig(warmup=0, repeats=3, min_time_s=0.05), "cpu")
    # a linear layer takes microseconds: only the time budget can have asked for more calls
    assert result.repeats > 3
    assert result.repeats * result.mean_ms >= 50.0


def test_channels_last_is_undone_and_the_model_stays_usable() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    measure_latency(model, (3, 12, 12), LatencyConfig(channels_last=True, repeats=3), "cpu")
    weight = model[0].weight
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)
    assert model(torch.zeros(1, 3, 12, 12)).shape == (1, 8, 10, 10)


def test_input_shape_validation() -> None:
    cfg = LatencyConfig(batch_size=4, repeats=3, warmup=0)
    assert measure_latency(nn.Conv2d(3, 3, 1), (4, 3, 5, 5), cfg, "cpu").input_shape == (4, 3, 5, 5)
    with pytest.raises(ValueError, match="batch_size"):
        measure_latency(nn.Conv2d(3, 3, 1), (1, 3, 5, 5), cfg, "cpu")
    with pytest.raises(ValueError, match="input_shape"):
        measure_latency(nn.Conv2d(3, 3, 1), (5, 5), cfg, "cpu")


def test_resolve_device() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def _spec(alpha: float = 1.0) -> ArchSpec:
    return ArchSpec.uniform("resnet18", StageSpec(spsa=True, spsa_alpha=alpha), width=0.25, stem="cifar",
                            input_size=16, num_classes=10)


def test_latency_key_is_stable_and_sensitive() -> None:
    cfg = LatencyConfig()
    key = latency_key(_spec(), (3, 16, 16), cfg, "cpu")
    assert re.fullmatch(r"[0-9a-f]{64}", key), key  # a sha256 hex digest
    assert key == latency_key(_spec(), (3, 16, 16), LatencyConfig(), "cpu")
    assert key == latency_key(_spec(), (1, 3, 16, 16), cfg, "cpu")  # the same timed input
    different = [
        latency_key(_spec(alpha=2.0), (3, 16, 16), cfg, "cpu"),
        latency_key(_spec(), (3, 32, 32), cfg, "cpu"),
        latency_key(_spec(), (3, 16, 16), LatencyConfig(batch_size=8), "cpu"),
        latency_key(_spec(), (3, 16, 16), LatencyConfig(threads=torch.get_num_threads() + 1), "cpu"),
    ]
    assert len({key, *different}) == 5
