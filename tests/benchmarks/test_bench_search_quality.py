"""The search-quality benchmark's statistics (hypervolume, trials to reach, bootstrap interval) and
its one-shot oracle on a tiny supernet."""

from __future__ import annotations

import statistics
from pathlib import Path
from types import ModuleType

import pytest
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_search_quality")


def test_hypervolume_staircase(bench: ModuleType) -> None:
    # (0.5, 2) covers 0.5 x 8; (0.8, 6) adds 0.3 x 4; (0.6, 7) is dominated; (0.9, 12) is past ref
    points = [(0.6, 7.0), (0.8, 6.0), (0.5, 2.0), (0.9, 12.0)]
    assert bench.hypervolume_2d(points, 10.0) == pytest.approx(0.5 * 8 + 0.3 * 4)


def test_trials_to_reach(bench: ModuleType) -> None:
    curve = [0.1, 0.3, 0.3, 0.55, 0.6]
    assert bench.trials_to_reach(curve, 0.3) == 2
    assert bench.trials_to_reach(curve, 0.55) == 4
    assert bench.trials_to_reach(curve, 0.1) == 1
    assert bench.trials_to_reach(curve, 0.61) is None


def test_bootstrap_ci_brackets_the_mean_and_keeps_pairs(bench: ModuleType) -> None:
    values = [0.1 * i for i in range(20)]
    low, high = bench.bootstrap_ci([values], statistics.fmean, reps=500, seed=1)
    assert low < statistics.fmean(values) < high
    assert high - low < max(values) - min(values)
    # paired columns: b = 2 a on every row, so every resample's ratio is exactly 0.5
    a = [1.0 + i for i in range(10)]
    b = [2 * x for x in a]
    low, high = bench.bootstrap_ci([a, b], lambda x, y: statistics.fmean(x) / statistics.fmean(y),
                                   reps=200, seed=2)
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bench.bootstrap_ci([a, b[:3]], statistics.fmean)


def test_oneshot_oracle_trains_caches_and_evaluates(bench: ModuleType, tmp_path: Path) -> None:
    import argparse

    from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig
    from spsa_nas.spec import ArchSpec, StageSpec

    space = tmp_path / "tiny.yaml"
    space.write_text("name: tiny\nbackbone: resnet18\nstem: cifar\ninput_size: 8\nwidth: [0.125]\n"
                     "all_stages:\n  spsa: [false, true]\n  heads: [1]\n  alpha: [1]\n"
                     "  channel_attn: [none, se]\n")
    args = argparse.Namespace(space=str(space), supernet_epochs=1, bn_batches=2, sampling="uniform",
                              supernet_cache=tmp_path / "supernets.pt")
    data = DataConfig(name="digits", train_subset=64)
    train = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2)
    fit, oracle = bench.oneshot_oracle(args, data, train)
    assert args.supernet_cache.exists()
    (key,) = oracle["supernets"]
    # a second run takes the supernet from the cache: the same weights, no training
    _, again = bench.oneshot_oracle(args, data, train)
    assert again["supernets"][key]["digest"] == oracle["supernets"][key]["digest"]

    latency = LatencyConfig(repeats=3, warmup=1, threads=1)
    evaluate = bench.Evaluator(data, train, latency, tmp_path / "evals.json", fit=fit, oracle={"k": 1})
    stages = tuple(StageSpec(channel_attn="se" if i % 2 else "none") for i in range(4))
    spec = ArchSpec.plain("resnet18", num_classes=10, in_channels=1, stem="cifar", input_size=8,
                          width=0.125).model_copy(update={"stages": stages})
    result = evaluate(spec.model_dump_json(), spec)
    assert 0.0 <= result["val_acc"] <= 1.0 and result["latency_ms"] > 0
    assert evaluate.evaluations == 1
    evaluate(spec.model_dump_json(), spec)  # the eval cache: not evaluated again
    assert evaluate.evaluations == 1

    # the figure a search scores: the interleaved ratio times the run's anchor (the first reference)
    key = spec.model_dump_json()
    raw = evaluate.results[key]
    assert raw["latency_ratio"] is not None and raw["reference_ms"] is not None
    scored = bench.Evaluator(data, train, latency, tmp_path / "evals.json", fit=fit, oracle={"k": 1},
                             figure="ratio")
    got = scored(key, spec)
    assert scored.evaluations == 0  # taken from the eval cache
    assert got["latency_ms"] == pytest.approx(raw["latency_ratio"] * raw["reference_ms"])
    assert scored.latency_figure(key) == pytest.approx(got["latency_ms"])


def test_ratio_figure_refuses_a_latency_without_ratio(bench: ModuleType, tmp_path: Path) -> None:
    from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig

    evaluate = bench.Evaluator(DataConfig(name="digits"), TrainConfig(), LatencyConfig(protocol="simple"),
                               None, figure="ratio")
    evaluate.results["a"] = {"val_acc": 0.5, "latency_ms": 3.0, "latency_ratio": None, "reference_ms": None}
    with pytest.raises(RuntimeError, match="no reference time was measured"):
        evaluate.anchor_ms()
    evaluate.results["b"] = {"val_acc": 0.5, "latency_ms": 3.0, "latency_ratio": 0.5, "reference_ms": 4.0}
    assert evaluate.latency_figure("b") == pytest.approx(2.0)
    with pytest.raises(RuntimeError, match="has no ratio"):
        evaluate.latency_figure("a")
    evaluate.figure = "median"
    assert evaluate.latency_figure("a") == pytest.approx(3.0)


def test_ratio_figure_needs_the_interleaved_protocol(bench: ModuleType, capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--latency-protocol", "simple", "--latency-figure", "ratio"])
    assert exc.value.code == 2
    assert "--latency-figure ratio needs --latency-protocol interleaved" in capsys.readouterr().err


def test_the_loss_estimate_is_the_accuracy_objective_of_the_oneshot_oracle(bench: ModuleType) -> None:
    import math

    from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig

    evaluate = bench.Evaluator(DataConfig(name="digits"), TrainConfig(), LatencyConfig(), None,
                               estimate="loss")
    evaluate.results["a"] = {"val_acc": 0.9, "val_loss": 0.5, "latency_ms": 3.0}
    evaluate.results["b"] = {"val_acc": 0.9, "latency_ms": 3.0}  # evaluated by the top-1 oracle
    assert evaluate.accuracy_figure("a") == pytest.approx(math.exp(-0.5))
    with pytest.raises(RuntimeError, match="no validation loss"):
        evaluate.accuracy_figure("b")
    evaluate.estimate = "accuracy"
    assert evaluate.accuracy_figure("a") == evaluate.accuracy_figure("b") == 0.9
