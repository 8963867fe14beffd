"""The `search` command's flags come from SearchConfig: every field has one, old and dotted names agree."""

from __future__ import annotations

import argparse

import pytest

from search_spaces.config import SearchConfig
from workers.cli import search
from workers.cli.config_flags import OWN_FIELDS, SHORT, _leaves, build_config, config_values, flag_of

BASE = ["search", "--space", "quick", "--dataset", "digits"]


def build_parser() -> argparse.ArgumentParser:
    """The `search` command as `spsa-nas` registers it."""
    parser = argparse.ArgumentParser(prog="spsa-nas")
    search.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _config(*flags: str) -> SearchConfig:
    args = build_parser().parse_args([*BASE, *flags])
    return build_config({**config_values(args), "space": "quick", "study_name": "s"})


def _option_strings() -> set[str]:
    parser = build_parser()
    search = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["search"]
    return {name for action in search._actions for name in action.option_strings}


def test_every_field_of_search_config_has_a_flag() -> None:
    options = _option_strings()
    paths = [path for path, _ in _leaves(SearchConfig)]
    assert len(paths) > 30 and not set(paths) & set(OWN_FIELDS)
    for path in paths:
        assert flag_of(path) in options and "--" + path.replace("_", "-") in options, path
    # the flags the CLI had before they were generated are all still there
    for old in ("--space", "--dataset", "--data-root", "--data-path", "--download", "--trials", "--timeout",
                "--epochs", "--batch-size", "--lr", "--latency-repeats", "--latency-warmup",
                "--train-subset", "--storage", "--study", "--artifacts", "--objective", "--latency-target",
                "--score-weight", "--hard", "--latency-budget", "--sampler", "--pruner", "--seed",
                "--device", "--parallelism", "--ray-address"):
        assert old in options, old


def test_short_and_dotted_names_give_the_same_config() -> None:
    short = _config("--epochs", "2", "--batch-size", "16", "--lr", "0.1", "--timeout", "30",
                    "--latency-repeats", "5", "--train-subset", "100", "--objective", "score",
                    "--latency-target", "2", "--score-weight", "-0.1", "--hard", "--latency-budget", "9")
    dotted = _config(*[arg for path, value in [
        ("train.epochs", "2"), ("train.batch_size", "16"), ("train.lr", "0.1"), ("timeout_s", "30"),
        ("latency.repeats", "5"), ("dataset.train_subset", "100"), ("objective.kind", "score"),
        ("objective.latency_target_ms", "2"), ("objective.weight", "-0.1"),
        ("objective.latency_budget_ms", "9")] for arg in ("--" + path.replace("_", "-"), value)],
        "--objective.hard")
    assert short == dotted
    assert short.train.epochs == 2 and short.timeout_s == 30.0 and short.objective.hard is True
    assert set(SHORT) <= {path for path, _ in _leaves(SearchConfig)}


def test_defaults_are_the_models_and_seed_also_seeds_training() -> None:
    assert _config() == SearchConfig(space="quick", study_name="s")
    seeded = _config("--seed", "7")
    assert seeded.seed == 7 and seeded.train.seed == 7
    apart = _config("--seed", "7", "--train.seed", "3")
    assert apart.seed == 7 and apart.train.seed == 3


def test_bounds_and_choices_come_from_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for flags, expected in [
        (["--trials", "0"], "argument --trials: Input should be greater than or equal to 1"),
        (["--train.amp", "maybe"], "invalid choice: 'maybe'"),
        (["--resources.num-gpus", "-1"], "argument --resources.num-gpus"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([*BASE, *flags])
        assert exit_.value.code == 2
        assert expected in capsys.readouterr().err
