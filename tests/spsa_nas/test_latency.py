"""Tests of spsa_nas.latency: both measurement protocols, the estimator and its interval, the result
record (old records included) and the cache key."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

import spsa_nas.latency as latency_module
from spsa_nas.config import LatencyConfig
from spsa_nas.latency import (
    REFERENCE,
    LatencyResult,
    latency_key,
    measure_group,
    measure_latency,
    median_ci,
    reference_model,
    reference_spec,
    resolve_device,
)
from spsa_nas.spec import ArchSpec, StageSpec

# The record of the first protocol (what studies written before KEY_VERSION 2 hold) ...
CONTRACT_FIELDS = {"median_ms", "p90_ms", "mean_ms", "std_ms", "iqr_ms", "min_ms", "max_ms", "repeats",
                   "warmup", "batch_size", "input_shape", "device", "device_name", "threads",
                   "torch_version"}
# ... and what the current protocols add to it.
NEW_FIELDS = {"protocol", "ci_low_ms", "ci_high_ms", "ci_level", "blocks", "block_size", "ci_extensions",
              "converged", "settled", "reference", "reference_ms", "ratio", "ratio_ci_low",
              "ratio_ci_high", "group_size", "affinity", "clocks", "measured_at",
              # the runtime (LatencyConfig.runtime) and what it took to prepare it
              "runtime", "runtime_version", "prepare_s", "onnx_graph_sha256"}
SIMPLE = {"protocol": "simple", "threads": None}  # the first protocol, with its default threads


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
    cfg = LatencyConfig(batch_size=2, warmup=3, repeats=7, **SIMPLE)
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
    durations_ns = [4_000_000, 1_000_000, 7_000_000, 2_000_000, 6_000_000, 3_000_000, 5_000_000]
    readings: list[int] = []
    for duration in durations_ns:  # each timed call reads the clock before and after
        start = 10_000_000 * len(readings)
        readings += [start, start + duration]
    clock = iter(readings)
    monkeypatch.setattr(latency_module.time, "perf_counter_ns", lambda: next(clock))
    cfg = LatencyConfig(warmup=1, repeats=7, min_time_s=0.0, **SIMPLE)
    result = measure_latency(nn.Conv2d(1, 2, 3), (1, 8, 8), cfg, "cpu")
    assert next(clock, None) is None  # every reading was taken: 7 timed calls, no more
    ms = np.arange(1.0, 8.0)
    assert result.repeats == 7
    assert (result.min_ms, result.median_ms, result.max_ms, result.mean_ms) == (1.0, 4.0, 7.0, 4.0)
    assert result.p90_ms == pytest.approx(6.4)  # numpy's linear percentile of 1..7
    assert result.iqr_ms == pytest.approx(5.5 - 2.5)
    assert result.std_ms == pytest.approx(float(ms.std(ddof=1)))  # sample std: 2.16, not 2.0


def test_result_record_round_trips_through_json() -> None:
    result = measure_latency(nn.Conv2d(1, 2, 3), (1, 8, 8), LatencyConfig(warmup=0, repeats=3, **SIMPLE),
                             "cpu")
    record = json.loads(json.dumps(result.to_dict()))
    assert set(record) == CONTRACT_FIELDS | NEW_FIELDS
    assert LatencyResult.from_dict(record) == result
    with pytest.raises(ValueError, match="fields"):
        LatencyResult.from_dict({**record, "extra": 1})


def test_threads_are_set_for_the_measurement_and_restored() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = LatencyConfig(threads=1, repeats=3, protocol="simple")
        result = measure_latency(nn.Conv2d(3, 3, 3), (3, 8, 8), cfg, "cpu")
        assert result.threads == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_min_time_keeps_repeating() -> None:
    model = nn.Linear(4, 4)
    result = measure_latency(model, (1, 1, 4), LatencyConfig(warmup=0, repeats=3, min_time_s=0.05, **SIMPLE),
                             "cpu")
    # a linear layer takes microseconds: only the time budget can have asked for more calls
    assert result.repeats > 3
    assert result.repeats * result.mean_ms >= 50.0


def test_channels_last_is_undone_and_the_model_stays_usable() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    measure_latency(model, (3, 12, 12), LatencyConfig(channels_last=True, repeats=3, **SIMPLE), "cpu")
    weight = model[0].weight
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)
    assert model(torch.zeros(1, 3, 12, 12)).shape == (1, 8, 10, 10)


def test_input_shape_validation() -> None:
    cfg = LatencyConfig(batch_size=4, repeats=3, warmup=0, **SIMPLE)
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


def test_key_version_is_part_of_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Figures cached under the first protocol (KEY_VERSION 1) are never reused by the current one."""
    key = latency_key(_spec(), (3, 16, 16), LatencyConfig(), "cpu")
    monkeypatch.setattr(latency_module, "KEY_VERSION", 1)
    assert latency_key(_spec(), (3, 16, 16), LatencyConfig(), "cpu") != key


# --- the estimator and its interval, on synthetic samples -------------------------------------------

def test_median_ci_takes_the_order_statistics_of_the_binomial() -> None:
    values = [float(v) for v in range(12, 0, -1)]  # 12..1, unsorted on purpose
    # n = 12 at 95 %: P(B <= 2) = 79/4096 = 0.019 (2x < 0.05), P(B <= 3) = 0.073: x_(3) .. x_(10)
    assert median_ci(values, 0.95) == (6.5, 3.0, 10.0)
    # at 80 %: 2 P(B <= 3) = 0.146 <= 0.2 < 2 P(B <= 4) = 0.388: x_(4) .. x_(9)
    assert median_ci(values, 0.80) == (6.5, 4.0, 9.0)
    assert median_ci([5.0, 1.0, 3.0], 0.95) == (3.0, 1.0, 5.0)  # too few for 95 %: [min, max]
    with pytest.raises(ValueError, match="at least one"):
        median_ci([], 0.95)


def test_median_ci_covers_the_true_median_at_its_level() -> None:
    """On 2000 skewed synthetic samples (lognormal, like timings) the 95 % interval of 15 block
    means covers the true median in at least 95 % of them (its exact coverage is 96.5 %)."""
    rng = np.random.default_rng(0)
    true_median = 1.0  # of exp(N(0, 0.5))
    covered = 0
    for _ in range(2000):
        _, low, high = median_ci(rng.lognormal(0.0, 0.5, size=15).tolist(), 0.95)
        covered += low <= true_median <= high
    assert covered / 2000 >= 0.95


class FakeClock:
    """A clock that only models move: each Ticker call advances it by that call's duration."""

    def __init__(self) -> None:
        self.now_ns = 0

    def __call__(self) -> int:
        return self.now_ns


class Ticker(nn.Module):
    """A model whose n-th call takes durations_ms(n) on the FakeClock."""

    def __init__(self, clock: FakeClock, durations_ms: object) -> None:
        super().__init__()
        self.clock, self.durations_ms, self.calls = clock, durations_ms, 0
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now_ns += int(self.durations_ms(self.calls) * 1e6)  # type: ignore[operator]
        self.calls += 1
        return x


FAST = {"warmup": 0, "repeats": 12, "blocks": 12, "block_ms": 20.0, "max_warmup_s": 5.0}


def _group(monkeypatch: pytest.MonkeyPatch, cand: object, ref: object,
           **cfg: object) -> dict[str, LatencyResult]:
    clock = FakeClock()
    monkeypatch.setattr(latency_module.time, "perf_counter_ns", clock)
    config = LatencyConfig(**{**FAST, **cfg})  # type: ignore[arg-type]
    return measure_group({"cand": Ticker(clock, cand)}, (1, 4, 4), config, "cpu",
                         reference=Ticker(clock, ref), reference_name="ref")


def test_median_of_block_means_ignores_a_disturbed_block_and_the_ratio_cancels_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidate 2 ms, reference 4 ms a call; one whole timed block of the candidate is 10x slower
    (another process took the CPU): the figure, its interval and the ratio are exact anyway."""
    first = _group(monkeypatch, lambda n: 2.0, lambda n: 4.0)["cand"]
    assert (first.median_ms, first.ci_low_ms, first.ci_high_ms, first.ratio) == (2.0, 2.0, 2.0, 0.5)
    assert first.block_size == 10 and first.blocks == 12 and first.ci_extensions == 0 and first.converged
    spike = range(first.warmup + 2 * first.block_size, first.warmup + 3 * first.block_size)  # 3rd block
    result = _group(monkeypatch, lambda n: 20.0 if n in spike else 2.0, lambda n: 4.0)
    cand, ref = result["cand"], result[REFERENCE]
    assert (cand.median_ms, cand.ci_low_ms, cand.ci_high_ms) == (2.0, 2.0, 2.0)
    assert (cand.ratio, cand.ratio_ci_low, cand.ratio_ci_high) == (0.5, 0.5, 0.5)
    assert cand.max_ms == 20.0 and cand.mean_ms > 2.0  # the single calls do see it
    assert cand.settled and cand.protocol == "interleaved" and cand.reference == "ref"
    assert cand.reference_ms == ref.median_ms == 4.0 and ref.ratio is None and cand.group_size == 2


def test_a_wide_interval_adds_blocks_until_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls of 1..3 ms at random: 12 blocks of one call leave a wide interval, so blocks are added
    (re-measured) until the time budget; the result says it did not converge."""
    rng = np.random.default_rng(1)
    noisy = rng.uniform(1.0, 3.0, size=100_000)
    result = _group(monkeypatch, lambda n: float(noisy[n]), lambda n: 2.0, repeats=3, block_ms=0.001,
                    max_time_s=0.2, max_ci_rel=0.03)["cand"]
    assert result.block_size == 1
    assert result.blocks > 12 and result.ci_extensions == result.blocks - 12
    assert not result.converged
    low, high = result.interval_ms()  # type: ignore[misc]
    assert low < result.median_ms < high and (high - low) > 0.03 * result.median_ms


# --- records of the first protocol, the reference ---------------------------------------------------

def test_records_of_the_first_protocol_still_load() -> None:
    old = {"median_ms": 3.0, "p90_ms": 4.0, "mean_ms": 3.2, "std_ms": 0.5, "iqr_ms": 0.4, "min_ms": 2.5,
           "max_ms": 6.0, "repeats": 30, "warmup": 5, "batch_size": 1, "input_shape": [1, 1, 16, 16],
           "device": "cpu", "device_name": "x", "threads": 2, "torch_version": "2.5.0"}
    assert set(old) == CONTRACT_FIELDS
    result = LatencyResult.from_dict(old)
    assert result.median_ms == 3.0 and result.protocol is None and result.interval_ms() is None
    with pytest.raises(ValueError, match="fields"):
        LatencyResult.from_dict({k: v for k, v in old.items() if k != "median_ms"})


def test_reference_is_the_plain_backbone_and_leaves_the_rng_alone() -> None:
    spec = _spec()
    ref = reference_spec(spec, LatencyConfig())
    assert ref is not None and ref.width == 0.5 and ref.stem == "cifar" and ref.input_size == 16
    assert all(not s.spsa and s.channel_attn == "none" for s in ref.stages)
    assert reference_spec(spec, LatencyConfig(reference_width=None)) is None
    assert reference_spec(spec, LatencyConfig(protocol="simple")) is None
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    built = reference_model(spec, LatencyConfig())
    assert built is not None and built[1] == "resnet18 w0.5 plain (cifar stem, 16 px)"
    assert torch.equal(torch.rand(3), expected)  # a trial trains the same whether or not it built one


def test_group_of_real_models_restores_them() -> None:
    a, b, ref = nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), nn.Conv2d(3, 2, 1)
    a.train()
    cfg = LatencyConfig(warmup=1, repeats=4, blocks=4, block_ms=1.0, max_time_s=0.5, max_warmup_s=0.2)
    results = measure_group({"a": a, "b": b}, (3, 8, 8), cfg, "cpu", reference=ref, reference_name="r")
    assert set(results) == {"a", "b", REFERENCE}
    assert a.training and not torch.is_inference_mode_enabled()
    for name in ("a", "b"):
        r = results[name]
        assert r.blocks is not None and r.blocks >= 4 and r.group_size == 3 and r.threads == 1
        assert r.ci_low_ms is not None and r.ci_high_ms is not None
        assert r.ci_low_ms <= r.median_ms <= r.ci_high_ms
        assert r.ratio_ci_low is not None and r.ratio is not None and r.ratio_ci_high is not None
        assert r.ratio_ci_low <= r.ratio <= r.ratio_ci_high
    with pytest.raises(ValueError, match="reference"):
        measure_group({REFERENCE: a}, (3, 8, 8), cfg, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_interleaved_protocol_records_clocks() -> None:
    model, ref = nn.Conv2d(3, 16, 3), nn.Conv2d(3, 8, 3)
    cfg = LatencyConfig(warmup=2, repeats=4, blocks=4, block_ms=2.0, max_time_s=1.0)
    result = measure_latency(model, (3, 32, 32), cfg, "cuda", reference=ref, reference_name="r")
    assert result.device.startswith("cuda") and result.protocol == "interleaved"
    assert result.ci_low_ms is not None and result.ci_low_ms <= result.median_ms
    assert isinstance(result.clocks, dict) and ("source" in result.clocks or "note" in result.clocks)
    assert next(model.parameters()).device.type == "cpu"
