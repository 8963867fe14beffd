"""The local search-engine subcommands of `spsa-nas`: search, best, export, spaces."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from importlib import import_module
from pathlib import Path
from typing import Any, get_args

import optuna
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.engine import make_url

from search_spaces.config import ObjectiveConfig, SearchConfig
from search_spaces.space import SearchSpace, SpaceError, builtin_spaces, load_space
from search_spaces.study import (
    create_study,
    describe_spec,
    finished,
    load_study,
    pareto_front,
    select_best,
    storage_for,
    trial_counts,
)
from search_spaces.suggest import resolve_io
from spsa_nas.config import DataConfig, DatasetName, LatencyConfig, TrainConfig
from spsa_nas.spec import stage_table
from workers.cli import UsageError

DEFAULT_STORAGE = "sqlite:///runs/spsa-nas.db"
DEFAULT_ARTIFACTS = "runs/artifacts"


# ---------------------------------------------------------------------------------------------
# helpers


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _open_storage(url: str, *, must_exist: bool) -> optuna.storages.RDBStorage:
    try:
        parsed = make_url(url)
    except Exception:
        raise UsageError(f"--storage {url!r} is not a database URL (e.g. {DEFAULT_STORAGE})") from None
    if (
        must_exist
        and parsed.get_backend_name() == "sqlite"
        and parsed.database
        and parsed.database != ":memory:"
        and not Path(parsed.database).exists()
    ):
        raise UsageError(f"no database at {parsed.database}; run `spsa-nas search` first or pass --storage")
    try:
        return storage_for(url)
    except Exception as exc:  # driver errors: unreachable server, bad credentials, ...
        raise UsageError(
            f"cannot open storage {url!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None


def _resolve_study(storage: optuna.storages.RDBStorage, name: str | None) -> optuna.Study:
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


def _fmt(value: Any, spec: str = ".4f") -> str:
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


def _front_table(title: str, trials: list[optuna.trial.FrozenTrial], chosen: int | None = None) -> Table:
    table = Table(title=title)
    for column in ("trial", "val acc", "test top1", "latency ms", "params", "architecture"):
        table.add_column(column, justify="left" if column == "architecture" else "right")
    for t in trials:
        a = t.user_attrs
        mark = " *" if t.number == chosen else ""
        table.add_row(
            f"{t.number}{mark}",
            _fmt(a.get("val_acc")),
            _fmt(a.get("top1")),
            _fmt(a.get("latency_ms"), ".3f"),
            _fmt(a.get("params"), ","),
            describe_spec(a.get("spec") or {}),
        )
    return table


# ---------------------------------------------------------------------------------------------
# search


def _config_from_args(args: argparse.Namespace, space: SearchSpace) -> SearchConfig:
    try:
        objective = ObjectiveConfig(
            kind=args.objective,
            latency_target_ms=args.latency_target,
            latency_budget_ms=args.latency_budget,
            **({"weight": args.score_weight} if args.score_weight is not None else {}),
            hard=args.hard,
        )
        data = DataConfig(
            name=args.dataset,
            data_root=args.data_root,
            path=args.data_path,
            train_subset=args.train_subset,
            download=args.download,
        )
        train_fields: dict[str, Any] = {"epochs": args.epochs}
        if args.batch_size is not None:
            train_fields["batch_size"] = args.batch_size
        if args.lr is not None:
            train_fields["lr"] = args.lr
        train = TrainConfig(seed=args.seed, **train_fields)
        latency_fields: dict[str, Any] = {}
        if args.latency_repeats is not None:
            latency_fields["repeats"] = args.latency_repeats
        if args.latency_warmup is not None:
            latency_fields["warmup"] = args.latency_warmup
        latency = LatencyConfig(**latency_fields)
        is_builtin = args.space in builtin_spaces()
        study_name = args.study or f"{space.name}-{args.dataset}"
        return SearchConfig(
            study_name=study_name,
            space=args.space if is_builtin else space.model_dump(mode="json", exclude_unset=True),
            dataset=data,
            trials=args.trials,
            timeout_s=args.timeout,
            objective=objective,
            sampler=args.sampler,
            pruner=args.pruner,
            train=train,
            latency=latency,
            device=args.device,
            seed=args.seed,
            parallelism=args.parallelism,
        )
    except ValidationError as exc:
        raise UsageError(_validation_message(exc)) from None


def _check_data(cfg: SearchConfig, space: SearchSpace) -> None:
    from spsa_nas.data import dataset_in_channels, dataset_num_classes  # torch: only when searching

    try:
        resolve_io(
            space, num_classes=dataset_num_classes(cfg.dataset), in_channels=dataset_in_channels(cfg.dataset)
        )
    except ValueError as exc:  # DataError is a ValueError
        raise UsageError(str(exc)) from None


def _run_search(args: argparse.Namespace) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress display says it all
    try:
        space = load_space(args.space)
    except SpaceError as exc:
        raise UsageError(str(exc)) from None
    cfg = _config_from_args(args, space)
    _check_data(cfg, space)
    storage = _open_storage(args.storage, must_exist=False)
    try:
        study = create_study(cfg, storage, space=space)
    except ValueError as exc:  # a different config under this name, a pruner for pareto, ...
        raise UsageError(str(exc)) from None
    console = Console(stderr=True)
    for note in space.notes:
        console.print(f"[yellow]note:[/] {note}")
    before = finished(trial_counts(study))
    console.print(
        f"study {cfg.study_name!r} in {args.storage}: {before}/{cfg.trials} trials finished; "
        f"objective {cfg.objective.kind}, sampler {cfg.sampler}, space {space.name}"
    )
    if args.parallelism > 1 or args.ray_address:
        try:
            ray_runner = import_module("workers.ray_runner")
        except ModuleNotFoundError as exc:
            raise UsageError(
                f"the Ray runner is not available ({exc}); run without --parallelism and --ray-address"
            ) from None
        summary = ray_runner.run_search(
            cfg, args.storage, artifact_dir=args.artifacts, ray_address=args.ray_address
        )
    else:
        summary = _search_local(cfg, args, console, before)
    study = load_study(cfg.study_name, storage)
    return _report(study, cfg, summary, console, args)


def _search_local(
    cfg: SearchConfig, args: argparse.Namespace, console: Console, before: int
) -> dict[str, Any]:
    from workers.local import run_local  # torch and the trial machinery: only when searching

    progress = Progress(
        TextColumn("[bold]search"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=False,
    )
    best_text = "best: -"

    def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal best_text
        a = trial.user_attrs
        if trial.state == optuna.trial.TrialState.COMPLETE:
            line = (
                f"trial {trial.number}: val {_fmt(a.get('val_acc'))} top1 {_fmt(a.get('top1'))} "
                f"{_fmt(a.get('latency_ms'), '.3f')} ms  {describe_spec(a.get('spec') or {})}"
            )
        else:
            why = a.get("error") or a.get("reason") or ""
            line = f"trial {trial.number}: {trial.state.name.lower()} {why}".rstrip()
        progress.console.print(line, markup=False, highlight=False)
        try:
            best = select_best(study, latency_budget_ms=args.latency_budget)
            best_text = (
                f"best: #{best.number} val {best.user_attrs['val_acc']:.4f} @ "
                f"{best.user_attrs['latency_ms']:.3f} ms"
            )
        except LookupError:
            pass
        progress.update(task, completed=finished(trial_counts(study)), description=best_text)

    with progress:
        task = progress.add_task(best_text, total=cfg.trials, completed=min(before, cfg.trials))
        return run_local(cfg, args.storage, artifact_dir=args.artifacts, progress=on_trial)


def _report(
    study: optuna.Study,
    cfg: SearchConfig,
    summary: dict[str, Any],
    console: Console,
    args: argparse.Namespace,
) -> int:
    counts = trial_counts(study)
    out = Console()
    front = pareto_front(study)
    chosen = None
    with contextlib.suppress(LookupError):
        chosen = select_best(study, latency_budget_ms=args.latency_budget).number
    if front:
        out.print(
            _front_table(
                f"Pareto front of {study.study_name} (* = best by the selection rule)", front, chosen
            )
        )
    console.print(
        f"{finished(counts)}/{cfg.trials} finished ({counts['complete']} complete, "
        f"{counts['pruned']} pruned, {counts['fail']} failed); stopped: "
        f"{summary.get('stopped', '-')}"
    )
    console.print(f"watch it: optuna-dashboard {args.storage}")
    if summary.get("stopped") == "failing":
        console.print(f"[red]trials keep failing:[/] {summary.get('last_error')}", markup=True)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# best, export, spaces


def _chosen(args: argparse.Namespace) -> tuple[optuna.Study, optuna.trial.FrozenTrial]:
    storage = _open_storage(args.storage, must_exist=True)
    study = _resolve_study(storage, args.study)
    try:
        trial = select_best(
            study, latency_budget_ms=args.latency_budget, trial_number=getattr(args, "trial", None)
        )
    except LookupError as exc:
        raise UsageError(str(exc.args[0])) from None
    return study, trial


def _run_best(args: argparse.Namespace) -> int:
    study, trial = _chosen(args)
    front = pareto_front(study)
    if args.json:
        print(
            json.dumps(
                {
                    "study": study.study_name,
                    "latency_budget_ms": args.latency_budget,
                    "best": trial_row(trial),
                    "pareto_front": [trial_row(t) for t in front],
                    "counts": trial_counts(study),
                },
                indent=2,
            )
        )
        return 0
    out = Console()
    out.print(_front_table(f"Pareto front of {study.study_name}", front, trial.number))
    a = trial.user_attrs
    out.print(
        f"best: trial {trial.number}: val acc {_fmt(a.get('val_acc'))}, test top1 "
        f"{_fmt(a.get('top1'))}, {_fmt(a.get('latency_ms'), '.3f')} ms, "
        f"{_fmt(a.get('params'), ',')} params",
        markup=False,
        highlight=False,
    )
    out.print(describe_spec(a.get("spec") or {}), markup=False, highlight=False)
    return 0


def _run_export(args: argparse.Namespace) -> int:
    if args.trial is None and not args.best:
        raise UsageError("pass --trial N or --best")
    from optuna.artifacts import FileSystemArtifactStore, download_artifact

    from spsa_nas import build_model
    from spsa_nas.export import export_onnx
    from spsa_nas.spec import ArchSpec

    study, trial = _chosen(args)
    artifact_id = trial.user_attrs.get("weights_artifact")
    if not artifact_id:
        raise UsageError(f"trial {trial.number} has no weights artifact")
    store_dir = Path(args.artifacts)
    if not (store_dir / artifact_id).exists():
        raise UsageError(
            f"weights artifact {artifact_id} of trial {trial.number} is not in {store_dir}; "
            "pass the --artifacts directory the search used"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = ArchSpec.model_validate(trial.user_attrs["spec"])
    weights = out / "weights.safetensors"
    weights.unlink(missing_ok=True)
    download_artifact(
        artifact_store=FileSystemArtifactStore(str(store_dir)),
        file_path=str(weights),
        artifact_id=artifact_id,
    )
    (out / "spec.json").write_text(spec.model_dump_json(indent=2) + "\n")
    metrics = {k: v for k, v in trial_row(trial).items() if k != "spec"}
    metrics["study"] = study.study_name
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    model = build_model(spec, weights=weights).eval()
    onnx_path = export_onnx(model, out / "model.onnx")
    print(
        f"exported trial {trial.number} of {study.study_name} to {out}: spec.json, "
        f"weights.safetensors, {Path(onnx_path).name}, metrics.json"
    )
    return 0


def _run_spaces(args: argparse.Namespace) -> int:
    out = Console()
    if args.name:
        try:
            space = load_space(args.name)
        except SpaceError as exc:
            raise UsageError(str(exc)) from None
        out.print(f"[bold]{space.name}[/]: {space.description}")
        out.print(f"{space.summary()}; size: {_size(space)}")
        for backbone in space.backbones:
            table = Table(title=backbone)
            for column in ("stage", "ch", "map", "spsa", "heads", "alpha", "channel_attn", "attn_order"):
                table.add_column(column)
            for i, stage in enumerate(space.stage_choices(backbone), start=1):
                c = stage.choices
                alpha = (
                    c.alpha.model_dump_json(exclude_none=True)
                    if not isinstance(c.alpha, list)
                    else ", ".join(f"{a:g}" for a in c.alpha)
                )
                channels = "/".join(str(stage_table(backbone, w)[i - 1].channels) for w in space.widths)
                table.add_row(
                    f"{i} {stage.info.name}",
                    channels,
                    f"{stage.feature_size}x{stage.feature_size}",
                    ", ".join(str(s).lower() for s in c.spsa),
                    ", ".join(map(str, c.heads)),
                    alpha,
                    ", ".join(c.channel_attn),
                    ", ".join(c.attn_order),
                )
            out.print(table)
        for note in space.notes:
            out.print(f"note: {note}")
        return 0
    table = Table(title="built-in search spaces")
    for column in ("name", "backbone / input", "architectures", "description"):
        table.add_column(column)
    for name, space in builtin_spaces().items():
        table.add_row(name, space.summary(), _size(space), space.description)
    out.print(table)
    return 0


def _size(space: SearchSpace) -> str:
    size = space.size()
    return "continuous (alpha range)" if size is None else f"{size:,}"


# ---------------------------------------------------------------------------------------------
# registration


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _storage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default {DEFAULT_STORAGE})"
    )
    parser.add_argument("--study", default=None, help="study name (default: the only one there)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `search`, `best`, `export` and `spaces` to the `spsa-nas` command."""
    p = subparsers.add_parser("search", help="run (or resume) a search on this machine")
    p.add_argument("--space", required=True, help="built-in space name or a YAML file")
    p.add_argument("--dataset", required=True, choices=get_args(DatasetName))
    p.add_argument("--data-root", default=None, help="where datasets live")
    p.add_argument("--data-path", default=None, help="dataset path under the data root")
    p.add_argument("--download", action="store_true", help="cifar: download when absent")
    p.add_argument("--trials", type=_positive_int, default=8, help="finished trials to reach")
    p.add_argument("--timeout", type=_positive_float, default=None, help="seconds for this run")
    p.add_argument("--epochs", type=_positive_int, default=3)
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--lr", type=_positive_float, default=None)
    p.add_argument(
        "--latency-repeats",
        type=_positive_int,
        default=None,
        help="timed forward passes per latency measurement (>= 3)",
    )
    p.add_argument("--latency-warmup", type=int, default=None, help="untimed passes first")
    p.add_argument(
        "--train-subset",
        type=_positive_float,
        default=None,
        help="fraction (<=1) or number (>1) of training samples",
    )
    p.add_argument(
        "--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default {DEFAULT_STORAGE})"
    )
    p.add_argument("--study", default=None, help="study name (default: <space>-<dataset>)")
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact directory (weights)")
    p.add_argument("--objective", choices=("pareto", "score"), default="pareto")
    p.add_argument(
        "--latency-target", type=_positive_float, default=None, help="ms; the score objective's target"
    )
    p.add_argument("--score-weight", type=float, default=None, help="score exponent w (<= 0)")
    p.add_argument("--hard", action="store_true", help="hard score: w = 0 under the target, -1 over")
    p.add_argument(
        "--latency-budget",
        type=_positive_float,
        default=None,
        help="ms; slower candidates are rejected before training",
    )
    p.add_argument("--sampler", choices=("auto", "tpe", "nsga2", "random"), default="auto")
    p.add_argument("--pruner", choices=("none", "median", "hyperband"), default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--parallelism", type=_positive_int, default=1, help="> 1: trials on Ray")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster")
    p.set_defaults(run=_run_search)

    p = subparsers.add_parser("best", help="the Pareto front and the chosen architecture of a study")
    _storage_args(p)
    p.add_argument("--latency-budget", type=_positive_float, default=None, help="ms")
    p.add_argument("--trial", type=int, default=None, help="show this trial instead")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_run_best)

    p = subparsers.add_parser("export", help="write a trial's spec.json, weights and model.onnx")
    _storage_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, default=None, help="trial number")
    which.add_argument("--best", action="store_true", help="the best trial by the selection rule")
    p.add_argument("--latency-budget", type=_positive_float, default=None, help="ms (with --best)")
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact directory of the search")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=_run_export)

    p = subparsers.add_parser("spaces", help="list the built-in search spaces, or show one")
    p.add_argument("name", nargs="?", default=None, help="a space name or YAML file to show")
    p.set_defaults(run=_run_spaces)


__all__ = ["register", "trial_row"]
