"""bench_oneshot.py: its statistics on degenerate input (an undefined tau is null, never a crash or NaN)
and the cost of fine-tuning and of few-shot sub-supernets counted in a tiny real run."""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_oneshot")


def test_tau_interval_of_constant_accuracies_is_undefined(bench: ModuleType) -> None:
    # every standalone accuracy 1.0 (a saturated budget): no resample has a tau
    assert bench.tau_interval([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], 200, 0) == (None, None)
    low, high = bench.tau_interval([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], 200, 0)
    assert low == high == pytest.approx(1.0)


def test_an_undefined_tau_is_none_without_a_warning(bench: ModuleType) -> None:
    # one pair (a top half of one architecture in a tiny run), a constant side: scipy warns and
    # gives NaN; the benchmark says None and warns nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bench._tau([0.5], [0.7]) is None
        assert bench._tau([0.1, 0.2, 0.3], [1.0, 1.0, 1.0]) is None
        assert bench._tau([0.1, 0.2, 0.3], [0.3, 0.2, 0.1]) == pytest.approx(-1.0)


def test_output_has_no_nan(bench: ModuleType) -> None:
    cleaned = bench.json_safe({"tau": math.nan, "ci": [math.nan, 0.5], "pairs": [{"x": (1.0, math.nan)}]})
    assert cleaned == {"tau": None, "ci": [None, 0.5], "pairs": [{"x": [1.0, None]}]}
    json.loads(json.dumps(cleaned, allow_nan=False))


def test_a_sub_supernet_draws_only_paths_with_its_choice(bench: ModuleType) -> None:
    # a stand-in for the space's sampler: stage 1's channel attention drawn among four
    def sample(rng: random.Random) -> SimpleNamespace:
        return SimpleNamespace(stages=[SimpleNamespace(channel_attn=rng.choice(["none", "se", "eca", "cbam"]))
                                       for _ in range(2)])

    draw = bench._restricted(sample, 1, "eca")
    rng = random.Random(0)
    paths = [draw(rng) for _ in range(200)]
    assert {p.stages[1].channel_attn for p in paths} == {"eca"}
    assert {p.stages[0].channel_attn for p in paths} == {"none", "se", "eca", "cbam"}  # the rest as drawn


def test_fine_tuning_and_sub_supernets_count_in_the_cost(bench: ModuleType, tmp_path: Path) -> None:
    # a tiny real run (3 architectures, a few steps), then the same one-shot part with each path
    # fine-tuned 5 steps: its training epochs grow by candidates x supernets x 5 steps; then with
    # stage 3 split (quick: 4 channel attentions): by supernets x 4 sub-supernets x 3 steps
    tiny = ["--archs", "3", "--seeds", "2", "--steps", "4", "--supernet-steps", "4", "--samples", "400",
            "--bn-batches", "1", "--bootstrap", "20", "--cost-candidates", "10", "--retrain", "1"]
    first = bench.main([*tiny, "--out", str(tmp_path / "plain.json")])
    tuned = bench.main([*tiny, "--supernets", "2", "--finetune-steps", "5",
                        "--reuse", str(tmp_path / "plain.json")])
    assert tuned["standalone_reused_from"] == str(tmp_path / "plain.json")
    assert tuned["budget"]["finetune_steps"] == 5
    loader_steps = first["task"]["train_images"] // 32
    one_training = first["cost"]["standalone_train_epochs"] / 10  # the retrained finalist's epochs
    supernet = first["cost"]["oneshot_train_epochs"] - one_training
    expected = 2 * supernet + 10 * 2 * 5 / loader_steps + one_training
    assert tuned["cost"]["oneshot_train_epochs"] == pytest.approx(expected)
    split = bench.main([*tiny, "--supernets", "2", "--split-stage", "3", "--split-steps", "3",
                        "--reuse", str(tmp_path / "plain.json")])
    assert split["budget"]["split_choices"] == ["none", "se", "eca", "cbam"]
    assert split["budget"]["split_steps"] == 3
    assert split["cost"]["oneshot_train_epochs"] == pytest.approx(
        2 * supernet + 2 * 4 * 3 / loader_steps + one_training)
    with pytest.raises(SystemExit, match="the space has 4 stages"):
        bench.main([*tiny, "--split-stage", "4", "--reuse", str(tmp_path / "plain.json")])
    for result in (first, tuned, split):
        assert len(result["pairs"]) == 3
        assert all(0.0 <= p["oneshot"] <= 1.0 and p["oneshot_loss"] > 0 for p in result["pairs"])
