"""What the engine's commands share: the storage and study as usage errors, number formats, trial tables."""

from __future__ import annotations

import argparse
import math
from typing import Any

import optuna
from optuna.storages import BaseStorage
from rich.table import Table

from search_spaces.storage import database_url, open_storage, sqlite_file
from search_spaces.study import describe_spec, load_study
from workers.cli import UsageError

DEFAULT_STORAGE = "sqlite:///runs/spsa-nas.db"
DEFAULT_ARTIFACTS = "runs/artifacts"


def open_storage_arg(url: str, *, must_exist: bool) -> BaseStorage:
    """The storage of `--storage URL` (search_spaces.storage.open_storage), with usage errors."""
    try:
        database_url(url)
    except ValueError:
        raise UsageError(f"--storage {url!r} is not a database URL (e.g. {DEFAULT_STORAGE})") from None
    path = sqlite_file(url)
    if must_exist and path is not None and not path.exists():
        raise UsageError(f"no database at {path}; run `spsa-nas search` first or pass --storage")
    try:
        return open_storage(url)
    except Exception as exc:  # driver errors: unreachable server, bad credentials, ...
        raise UsageError(
            f"cannot open storage {url!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None


def resolve_study(storage: BaseStorage, name: str | None) -> optuna.Study:
    """The study `name`, or the only one in the storage when `name` is None."""
    if name is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        if len(names) != 1:
            raise UsageError(
                f"pass --study NAME; studies in this storage: {', '.join(names) if names else 'none'}"
            )
        name = names[0]
    try:
        return load_study(name, storage)
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None


def fmt(value: Any, spec: str = ".4f") -> str:
    """`value` formatted with `spec`; "-" for None."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def trial_row(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The JSON-able summary of one trial used by `best` and the tables."""
    attrs = trial.user_attrs
    return {
        "trial": trial.number,
        "state": trial.state.name,
        "values": list(trial.values) if trial.values else None,
        "val_acc": attrs.get("val_acc"),
        "top1": attrs.get("top1"),
        "top5": attrs.get("top5"),
        "latency_ms": attrs.get("latency_ms"),
        "params": attrs.get("params"),
        "flops": attrs.get("flops"),
        "epochs": attrs.get("epochs"),
        "weights_artifact": attrs.get("weights_artifact"),
        "spec": attrs.get("spec"),
    }


def is_detection(attrs: dict[str, Any]) -> bool:
    """Whether a trial (its user attrs) is a detector's: its `val_acc` is then the box AP."""
    return (attrs.get("spec") or {}).get("task") == "detection"


def accuracy_labels(trials: list[optuna.trial.FrozenTrial]) -> tuple[str, str]:
    """The names of a trial's validation and test accuracy in tables: a classifier's accuracy and
    top-1, or a detector's COCO box AP (`val_acc` holds the validation AP, `detection` the test's)."""
    if any(is_detection(t.user_attrs) for t in trials):
        return "val box AP", "test box AP"
    return "val acc", "test top1"


def accuracy_on_test(attrs: dict[str, Any]) -> Any:
    """A trial's test figure: top-1 of a classifier, the test split's box AP of a detector."""
    if is_detection(attrs):
        return attrs.get("ap")  # DetectionResult.metrics: the test part's COCO metrics, flat
    return attrs.get("top1")


def front_table(title: str, trials: list[optuna.trial.FrozenTrial], chosen: int | None = None) -> Table:
    """A table of trials (the Pareto front): accuracies, latency, size, architecture; * = chosen."""
    table = Table(title=title)
    for column in ("trial", *accuracy_labels(trials), "latency ms", "params", "architecture"):
        table.add_column(column, justify="left" if column == "architecture" else "right")
    for t in trials:
        a = t.user_attrs
        mark = " *" if t.number == chosen else ""
        table.add_row(
            f"{t.number}{mark}",
            fmt(a.get("val_acc")),
            fmt(accuracy_on_test(a)),
            fmt(a.get("latency_ms"), ".3f"),
            fmt(a.get("params"), ","),
            describe_spec(a.get("spec") or {}),
        )
    return table


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def storage_args(parser: argparse.ArgumentParser) -> None:
    """--storage and --study of the commands that read a study."""
    parser.add_argument(
        "--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default {DEFAULT_STORAGE})"
    )
    parser.add_argument("--study", default=None, help="study name (default: the only one there)")


__all__ = [
    "DEFAULT_ARTIFACTS",
    "DEFAULT_STORAGE",
    "fmt",
    "front_table",
    "open_storage_arg",
    "positive_float",
    "resolve_study",
    "storage_args",
    "trial_row",
]
