"""Every benchmark refuses a bad count, size or time at once, as a usage error naming the argument."""

from __future__ import annotations

import argparse

import pytest
from bench_loader import load_benchmark

CASES = [
    ("bench_spsa_op", ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    ("bench_spsa_op", ["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    ("bench_spsa_resnet50", ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    ("bench_spsa_resnet50", ["--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
    ("bench_spsa_resnet50", ["--trial-max-time-s", "inf"], "--trial-max-time-s: expected a finite"),
    ("bench_gate_floor", ["--rounds", "2"], "argument --rounds: must be at least 3, got 2"),
    ("bench_search_quality", ["--seeds", "0"], "argument --seeds: must be at least 1, got 0"),
    ("bench_search_quality", ["--trials", "-1"], "argument --trials: must be at least 1, got -1"),
    ("bench_search_quality", ["--val-fraction", "1"], "argument --val-fraction: must be between 0 and 1"),
    ("bench_search_quality", ["--latency-max-time-s", "0"], "--latency-max-time-s: must be above 0"),
    ("bench_oneshot", ["--archs", "1"], "argument --archs: must be at least 2, got 1"),
    ("bench_oneshot", ["--finetune-steps", "-3"], "argument --finetune-steps: must be at least 0, got -3"),
    ("bench_oneshot", ["--finetune-lr", "0"], "argument --finetune-lr: must be above 0, got 0"),
    ("bench_oneshot", ["--supernet-lr", "nan"], "--supernet-lr: expected a finite number"),
    ("bench_oneshot", ["--steps", "1.5"], "argument --steps: expected a whole number, got '1.5'"),
    ("bench_oneshot_rest", ["--parallelism", "0"], "argument --parallelism: must be at least 1, got 0"),
    ("bench_oneshot_rest", ["--latency-max-warmup", "-1"], "--latency-max-warmup: must be 0 or more"),
    ("bench_latency_repeat", ["--runs", "1"], "argument --runs: must be at least 2, got 1"),
    ("bench_api", ["--rate", "-5"], "argument --rate: must be above 0, got -5"),
    ("bench_compile_opaque", ["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    ("bench_detection", ["--input-size", "0"], "argument --input-size: must be at least 1, got 0"),
    ("bench_ray_dispatch", ["--trial-s", "x"], "argument --trial-s: expected a number, got 'x'"),
    ("bench_ray_dispatch", ["--poll-s", "0"], "argument --poll-s: must be above 0, got 0"),
    ("profile_oneshot_candidates", ["--trials", "0"], "argument --trials: must be at least 1, got 0"),
    ("summarise_oneshot", ["x.json", "--bootstrap", "0"], "argument --bootstrap: must be at least 1, got 0"),
    ("summarise_oneshot", ["x.json", "--target", "-1"], "argument --target: must be above 0, got -1"),
    ("summarise_oneshot", ["x.json", "--first-seeds", "0"],
     "argument --first-seeds: must be at least 1, got 0"),
]


@pytest.mark.parametrize(("script", "argv", "message"), CASES, ids=[f"{c[0]}{' '.join(c[1])}" for c in CASES])
def test_a_bad_value_is_a_usage_error(script: str, argv: list[str], message: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    if script == "bench_gate_floor":
        load_benchmark("bench_spsa_resnet50")  # imported by name beside it
    with pytest.raises(SystemExit) as exc:
        load_benchmark(script).main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_the_types_accept_what_they_should() -> None:
    cli_args = load_benchmark("cli_args")
    assert cli_args.count()("3") == 3 and cli_args.count(0)("0") == 0
    assert cli_args.positive("0.5") == 0.5 and cli_args.non_negative("0") == 0.0
    assert cli_args.fraction("0.3") == 0.3
    for parse, text in [(cli_args.count(2), "1"), (cli_args.positive, "-inf"), (cli_args.fraction, "0")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
