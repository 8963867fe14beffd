"""`spsa-nas search`: run (or resume) a search on this machine or on Ray, and report how it ended."""

from __future__ import annotations

import argparse
import contextlib
from importlib import import_module

import optuna
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from search_spaces.config import SearchConfig
from search_spaces.finalists import remeasurement, seed_record
from search_spaces.loading import builtin_spaces, load_space
from search_spaces.run import RunReport
from search_spaces.space import SearchSpace, SpaceError
from search_spaces.study import (
    create_study,
    describe_spec,
    finished,
    pareto_front,
    select_best,
    study_config,
    trial_counts,
)
from search_spaces.suggest import resolve_io
from workers.cli import UsageError
from workers.cli.common import (
    DEFAULT_ARTIFACTS,
    DEFAULT_STORAGE,
    accuracy_on_test,
    fmt,
    front_table,
    is_detection,
    open_storage_arg,
)
from workers.cli.config_flags import add_config_flags, build_config, config_values

EXIT_FAILING = 1  # the exit status when the run ended because trials kept failing

EPILOG = (
    "Exit status: 0 when the run ended with its trials done, its time budget spent or cancelled; "
    f"{EXIT_FAILING} when trials kept failing (outcome 'failing': the last error is printed); 2 for "
    "bad arguments, an unknown space or dataset, or a study with another configuration; 130 on Ctrl-C."
)


def _config(args: argparse.Namespace, space: SearchSpace) -> SearchConfig:
    values = config_values(args)
    values["space"] = args.space if args.space in builtin_spaces() else \
        space.model_dump(mode="json", exclude_unset=True)
    values["study_name"] = args.study or f"{space.name}-{values['dataset']['name']}"
    return build_config(values)


def _check_data(cfg: SearchConfig, space: SearchSpace) -> None:
    from spsa_nas.data import dataset_in_channels, dataset_num_classes  # torch: only when searching

    try:
        resolve_io(
            space, num_classes=dataset_num_classes(cfg.dataset), in_channels=dataset_in_channels(cfg.dataset)
        )
    except ValueError as exc:  # DataError is a ValueError
        raise UsageError(str(exc)) from None


def run_search_command(args: argparse.Namespace) -> int:
    """Create (or resume) the study, run it locally or on Ray, print the front and the outcome."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress display says it all
    try:
        space = load_space(args.space)
    except SpaceError as exc:
        raise UsageError(str(exc)) from None
    cfg = _config(args, space)
    _check_data(cfg, space)
    storage = open_storage_arg(args.storage, must_exist=False)
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
    if cfg.strategy == "oneshot":
        console.print(
            f"strategy oneshot: a supernet per backbone and width trains first "
            f"({cfg.oneshot.supernet_epochs(cfg.train)} epochs), then {cfg.trials} candidates are "
            f"evaluated on its weights (accuracies are estimates), then the best {cfg.retrain_top_k} "
            "retrain from scratch"
        )
    if cfg.parallelism > 1 or args.ray_address:
        try:
            ray_runner = import_module("workers.ray_runner")
        except ModuleNotFoundError as exc:
            raise UsageError(
                f"the Ray runner is not available ({exc}); run without --parallelism and --ray-address"
            ) from None
        options = None if args.remeasure else ray_runner.RunnerOptions(remeasure_finalists=False)
        report = ray_runner.run_search(
            cfg.study_name, args.storage, artifact_dir=args.artifacts, ray_address=args.ray_address,
            options=options,
        )
    else:
        report = _search_local(cfg, args, console, before)
    return _report(study, report, console, args)


def _search_local(cfg: SearchConfig, args: argparse.Namespace, console: Console, before: int) -> RunReport:
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
                (f"trial {trial.number}: val AP {fmt(a.get('val_acc'))} test AP {fmt(accuracy_on_test(a))} "
                 if is_detection(a) else
                 f"trial {trial.number}: val {fmt(a.get('val_acc'))} top1 {fmt(a.get('top1'))} ")
                + f"{fmt(a.get('latency_ms'), '.3f')} ms  {describe_spec(a.get('spec') or {})}"
                + (" (one-shot estimate)" if a.get("oneshot_estimate") else "")
                + (f" (retrained trial {a['retrain_of']})" if "retrain_of" in a else "")
            )
        else:
            why = a.get("error") or a.get("reason") or ""
            line = f"trial {trial.number}: {trial.state.name.lower()} {why}".rstrip()
        progress.console.print(line, markup=False, highlight=False)
        try:
            best = select_best(study)  # within the search's own latency budget
            best_text = (
                f"best: #{best.number} {'val AP' if is_detection(best.user_attrs) else 'val'} "
                f"{best.user_attrs['val_acc']:.4f} @ "
                f"{best.user_attrs['latency_ms']:.3f} ms"
            )
        except LookupError:
            pass
        progress.update(task, completed=finished(trial_counts(study)), description=best_text)

    with progress:
        task = progress.add_task(best_text, total=cfg.trials, completed=min(before, cfg.trials))
        return run_local(cfg.study_name, args.storage, artifact_dir=args.artifacts, progress=on_trial,
                         remeasure_finalists=args.remeasure)


def _report(study: optuna.Study, report: RunReport, console: Console, args: argparse.Namespace) -> int:
    front = pareto_front(study)
    chosen = None
    with contextlib.suppress(LookupError):
        chosen = select_best(study).number
    if front:
        Console().print(
            front_table(f"Pareto front of {study.study_name} (* = best by the selection rule)", front, chosen)
        )
    console.print(report.line(), markup=False, highlight=False)
    if args.remeasure and report.outcome in ("done", "timeout"):
        _print_remeasured(study, console)
    if report.outcome in ("done", "timeout"):
        _print_reseeded(study, console)
    console.print(f"watch it: optuna-dashboard {args.storage}")
    if report.failing:
        console.print(f"[red]trials keep failing:[/] {escape(str(report.last_error))}")
        return EXIT_FAILING
    return 0


def _print_remeasured(study: optuna.Study, console: Console) -> None:
    """One line on the end-of-run re-measurement of the finalists (when this study has one)."""
    record = remeasurement(study)
    if record is None:
        return
    if record.get("error"):
        error = escape(str(record["error"])[-300:])
        console.print(f"[yellow]the finalists' re-measurement failed:[/] {error}")
        return
    numbers = ", ".join(sorted(record.get("trials") or {}, key=int))
    console.print(f"finalists re-measured together on {record.get('device')}: trials {numbers} "
                  "(spsa-nas best shows both figures)", markup=False, highlight=False)


def _print_reseeded(study: optuna.Study, console: Console) -> None:
    """One line on the end-of-run re-training of the top-k with more seeds (when this run did one)."""
    if not study_config(study).reseed.top_k:
        return
    record = seed_record(study)
    if record is None:
        return
    numbers = ", ".join(record["trials"]) or "none"
    line = f"re-trained with {record.get('seeds')} seeds: trials {numbers}"
    if record.get("stopped"):
        line += f" (stopped: {record['stopped']})"
    console.print(line + " (spsa-nas best ties on their mean ± std)", markup=False, highlight=False)
    if record.get("error"):
        console.print(f"[yellow]re-training with more seeds failed:[/] {escape(str(record['error'])[-300:])}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `search` to the `spsa-nas` command: its settings flags come from SearchConfig."""
    p = subparsers.add_parser("search", help="run (or resume) a search on this machine",
                              description="Run (or resume) a search: a study in --storage, trials "
                                          "here or on Ray (--parallelism > 1, --ray-address).",
                              epilog=EPILOG)
    p.add_argument("--space", required=True, help="built-in space name or a YAML file")
    p.add_argument("--study", default=None, help="study name (default: <space>-<dataset>)")
    p.add_argument(
        "--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default {DEFAULT_STORAGE})"
    )
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact directory (weights)")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster")
    p.add_argument("--no-remeasure", dest="remeasure", action="store_false",
                   help="do not re-measure the finalists' latencies together when the run ends "
                        "(done or timeout); `spsa-nas remeasure` does it later")
    add_config_flags(p)
    p.set_defaults(run=run_search_command)


__all__ = ["EXIT_FAILING", "register", "run_search_command"]
