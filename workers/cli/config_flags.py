"""The `search` command's settings flags, generated from SearchConfig's fields (--train.epochs, and today's
short names such as --epochs); types, choices, bounds and defaults come from the model."""

from __future__ import annotations

import argparse
import types
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from search_spaces.config import SearchConfig
from spsa_nas.errors import format_validation_error
from workers.cli import UsageError

DEST_PREFIX = "config:"  # argparse dest of a field: DEST_PREFIX + its dotted path
# Fields the `search` command sets itself: --space NAME|FILE, --study NAME (default <space>-<dataset>).
OWN_FIELDS = ("space", "study_name")
REQUIRED = ("dataset.name",)
# The short names the CLI had before its flags were generated; both spellings work.
SHORT = {
    "dataset.name": "--dataset",
    "dataset.data_root": "--data-root",
    "dataset.path": "--data-path",
    "dataset.download": "--download",
    "dataset.train_subset": "--train-subset",
    "timeout_s": "--timeout",
    "train.epochs": "--epochs",
    "train.batch_size": "--batch-size",
    "train.lr": "--lr",
    "latency.repeats": "--latency-repeats",
    "latency.warmup": "--latency-warmup",
    "latency.runtime": "--latency-runtime",
    "objective.kind": "--objective",
    "objective.latency_target_ms": "--latency-target",
    "objective.weight": "--score-weight",
    "objective.hard": "--hard",
    "objective.latency_budget_ms": "--latency-budget",
    "reseed.top_k": "--reseed-top-k",
    "reseed.seeds": "--reseed-seeds",
}
# Help of the fields that carry no description in the model.
HELP = {
    "dataset.name": "the dataset",
    "dataset.path": "dataset path under the data root",
    "dataset.data_root": "where datasets live",
    "dataset.download": "cifar: download when absent",
    "trials": "finished trials (complete + pruned) to reach",
    "timeout_s": "seconds for this run",
    "train.epochs": "epochs per trial",
    "latency.repeats": "timed forward passes per latency measurement",
    "latency.warmup": "untimed passes first",
    "objective.kind": "pareto: accuracy up and latency down; score: MnasNet's acc * (lat / target) ** w",
    "objective.latency_target_ms": "ms; the score objective's target",
    "objective.weight": "score exponent w",
    "objective.hard": "hard score: w = 0 under the target, -1 over",
    "objective.latency_budget_ms": "ms; slower candidates are rejected before training",
    "device": "auto, cpu, cuda, cuda:N, mps",
    "seed": "the search's seed (the sampler's; also --train.seed unless that is given)",
    "parallelism": "trials in flight at once; > 1: trials on Ray",
    "max_retries": "re-runs of a trial whose worker died (Ray)",
    "strategy": "standalone: every candidate trains from scratch; oneshot: one weight-sharing supernet "
                "is trained, candidates are evaluated on its weights, the best are retrained",
}


def flag_of(path: str) -> str:
    """The flag of a field: its short name if it has one, else --<dotted path with dashes>."""
    return SHORT.get(path) or "--" + path.replace("_", "-")


def _leaves(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    for name, info in model.model_fields.items():
        path = prefix + name
        if path in OWN_FIELDS:
            continue
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _leaves(info.annotation, path + ".")
        else:
            yield path, info


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _converter(path: str, annotation: Any, metadata: list[Any]) -> Any:
    """An argparse `type` that validates one value with the field's type and bounds."""
    adapter: TypeAdapter[Any] = TypeAdapter(Annotated[(annotation, *metadata)] if metadata else annotation)

    def convert(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(f"{format_validation_error(exc)}, got {text!r}") from None

    convert.__name__ = path  # argparse names the type in some messages
    return convert


def _add(parser: argparse.ArgumentParser, path: str, info: FieldInfo) -> None:
    names = [flag_of(path)]
    long = "--" + path.replace("_", "-")
    if long not in names:
        names.append(long)
    default = info.get_default(call_default_factory=True)
    text = info.description or HELP.get(path, "")
    if default is not None and path not in REQUIRED:
        text = f"{text} (default {default})" if text else f"default {default}"
    kwargs: dict[str, Any] = {"dest": DEST_PREFIX + path, "default": argparse.SUPPRESS,
                              "help": text.replace("%", "%%")}
    annotation = _without_none(info.annotation)
    if annotation is bool:
        parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        return
    if get_origin(annotation) is Literal:
        parser.add_argument(*names, choices=list(get_args(annotation)), required=path in REQUIRED, **kwargs)
        return
    if annotation not in (int, float, str):
        raise TypeError(f"SearchConfig field {path!r} has type {info.annotation!r}, which the search "
                        "command cannot express as a flag; add it to OWN_FIELDS and set it by hand")
    parser.add_argument(*names, type=_converter(path, annotation, info.metadata), required=path in REQUIRED,
                        metavar=annotation.__name__.upper(), **kwargs)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of SearchConfig (nested ones dotted), except OWN_FIELDS."""
    for path, info in _leaves(SearchConfig):
        _add(parser, path, info)


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The given flags as a nested dict of SearchConfig fields (what was not given is absent, so
    the model's defaults apply); --seed also seeds the training unless --train.seed is given."""
    given = {key.removeprefix(DEST_PREFIX): value for key, value in vars(args).items()
             if key.startswith(DEST_PREFIX)}
    if "seed" in given:
        given.setdefault("train.seed", given["seed"])
    values: dict[str, Any] = {}
    for path, value in given.items():
        *parents, name = path.split(".")
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return values


def _where(loc: tuple[int | str, ...]) -> str:
    path = ".".join(str(part) for part in loc)
    leaves = dict(_leaves(SearchConfig))
    return flag_of(path) if path in leaves else path


def build_config(values: dict[str, Any]) -> SearchConfig:
    """SearchConfig of `values`; UsageError naming the flag (or the section) of each problem."""
    try:
        return SearchConfig.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            where = _where(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg}" if where else msg)
        raise UsageError("; ".join(problems)) from None


__all__ = ["add_config_flags", "build_config", "config_values", "flag_of"]
