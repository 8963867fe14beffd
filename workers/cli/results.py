"""`spsa-nas best` and `spsa-nas export`: a study's Pareto front and chosen architecture, and its files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console
from rich.table import Table

from search_spaces.finalists import (
    ACCURACY_TOLERANCE,
    MAX_FINALISTS,
    BestDecision,
    decide_best,
    latency_figure,
    remeasured_fields,
    remeasurement,
)
from search_spaces.study import describe_spec, estimated_metrics, pareto_front, select_best, trial_counts
from workers.cli import UsageError
from workers.cli.common import (
    DEFAULT_ARTIFACTS,
    accuracy_labels,
    accuracy_on_test,
    fmt,
    open_storage_arg,
    positive_float,
    resolve_study,
    storage_args,
    trial_row,
)


def _chosen(args: argparse.Namespace) -> tuple[optuna.Study, optuna.trial.FrozenTrial]:
    storage = open_storage_arg(args.storage, must_exist=True)
    study = resolve_study(storage, args.study)
    try:
        trial = select_best(
            study, latency_budget_ms=args.latency_budget, trial_number=getattr(args, "trial", None)
        )
    except LookupError as exc:
        raise UsageError(str(exc.args[0])) from None
    return study, trial


def _latency_row(trial: optuna.trial.FrozenTrial, record: dict[str, Any] | None) -> dict[str, Any]:
    """trial_row with the latency figures: first pass (interval, ratio) and, for a finalist, its
    re-measured figure; `latency` is the figure that counts (latency_figure)."""
    a = trial.user_attrs
    figure = latency_figure(trial, record)
    return {
        **trial_row(trial),
        "latency_ci_ms": a.get("latency_ci_ms"),
        "latency_time_ms": a.get("latency_time_ms"),
        "latency_ratio": a.get("latency_ratio"),
        "latency_remeasured_ms": None,
        "latency_remeasured_ci_ms": None,
        "latency_remeasured_ratio": None,
        **remeasured_fields(record, trial.number),
        "latency": figure.to_dict() if figure is not None else None,
    }


def _interval(ms: Any, ci: Any) -> str:
    if ms is None:
        return "-"
    text = fmt(ms, ".3f")
    if isinstance(ci, list) and len(ci) == 2 and None not in ci:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def _latency_table(title: str, trials: list[optuna.trial.FrozenTrial], record: dict[str, Any] | None,
                   chosen: int | None = None) -> Table:
    """Trials with both latency figures: first pass and re-measured together (with intervals)."""
    table = Table(title=title)
    for column in ("trial", accuracy_labels(trials)[0], "first pass ms [interval]",
                   "re-measured ms [interval]", "ratio to reference", "architecture"):
        table.add_column(column, justify="left" if column == "architecture" else "right")
    for t in trials:
        row = _latency_row(t, record)
        ratio = row["latency_remeasured_ratio"] or row["latency_ratio"]
        table.add_row(f"{t.number}{' *' if t.number == chosen else ''}", fmt(row["val_acc"]),
                      _interval(row["latency_ms"], row["latency_ci_ms"]),
                      _interval(row["latency_remeasured_ms"], row["latency_remeasured_ci_ms"]),
                      fmt(ratio, ".3f"), describe_spec(t.user_attrs.get("spec") or {}))
    return table


def _figure_text(row: dict[str, Any]) -> str:
    """A tied candidate's latency (BestDecision.to_dict's rows): ms [interval] and where it is from."""
    source = {"remeasured": "re-measured together", "first_pass": "first pass"}.get(
        str(row.get("latency_source")), "no figure")
    return f"{_interval(row.get('latency_ms'), row.get('latency_ci_ms'))} ms ({source})"


def _seeds_text(row: dict[str, Any]) -> str:
    """' (mean m ± s over n seeds)' for a candidate re-trained with more seeds, else ''."""
    if row.get("val_acc_mean") is None or int(row.get("seeds") or 1) < 2:
        return ""
    return f" (mean {row['val_acc_mean']:.4f} ± {row['val_acc_std']:.4f} over {row['seeds']} seeds)"


def decision_lines(tie: dict[str, Any]) -> list[str]:
    """The tie decision (BestDecision.to_dict, also the API's `tie`) in words: whether the pick is
    beyond the noise, the tied set with their figures, the rules and the noise of each side."""
    chosen, tied = tie["chosen"], tie.get("tied") or []
    if tie.get("decided", len(tied) <= 1):
        lines = [f"no other candidate is within the noise of trial {chosen} ({tie['tie_rule']})"]
    else:
        others = ", ".join(str(row["trial"]) for row in tied[1:])
        lines = [f"TIE: trials {others} are within the noise of trial {chosen} ({tie['tie_rule']}); "
                 f"picked by: {tie['rule']}"]
        lines += [f"  trial {row['trial']}{' (picked)' if row['trial'] == chosen else ''}: val acc "
                  f"{fmt(row.get('val_acc'))}{_seeds_text(row)}, {_figure_text(row)}" for row in tied]
    lines.append(f"accuracy noise: {tie['accuracy_noise']}")
    lines.append(f"latency noise: {tie['latency_noise']}")
    return lines


def _print_decision(out: Console, decision: BestDecision) -> None:
    for line in decision_lines(decision.to_dict()):
        out.print(line, markup=False, highlight=False)


def run_best(args: argparse.Namespace) -> int:
    """Print the Pareto front with both latency figures, the chosen trial and whether it is tied
    (or their JSON with --json)."""
    storage = open_storage_arg(args.storage, must_exist=True)
    study = resolve_study(storage, args.study)
    try:
        decision = decide_best(study, latency_budget_ms=args.latency_budget, trial_number=args.trial,
                               accuracy_tolerance=args.accuracy_tolerance)
    except (LookupError, ValueError) as exc:
        raise UsageError(str(exc.args[0])) from None
    trial, front, record = decision.chosen, pareto_front(study), remeasurement(study)
    if args.json:
        print(
            json.dumps(
                {
                    "study": study.study_name,
                    "latency_budget_ms": args.latency_budget,
                    "best": {**_latency_row(trial, record), **_oneshot_labels(trial)},
                    "tie": decision.to_dict(),
                    "pareto_front": [_latency_row(t, record) for t in front],
                    "finalists": {k: v for k, v in (record or {}).items() if k != "trials"} or None,
                    "counts": trial_counts(study),
                },
                indent=2,
            )
        )
        return 0
    out = Console()
    out.print(_latency_table(f"Pareto front of {study.study_name}", front, record, trial.number))
    a = trial.user_attrs
    val_label, test_label = accuracy_labels([trial])
    out.print(
        f"best: trial {trial.number}: {val_label} {fmt(a.get('val_acc'))}, {test_label} "
        f"{fmt(accuracy_on_test(a))}, {fmt(a.get('latency_ms'), '.3f')} ms, "
        f"{fmt(a.get('params'), ',')} params",
        markup=False,
        highlight=False,
    )
    out.print(describe_spec(a.get("spec") or {}), markup=False, highlight=False)
    labels = _oneshot_labels(trial)
    if labels.get("estimated"):
        ranked = (f"; ranked by its validation loss {fmt(a.get('val_loss'), '.4f')}"
                  if a.get("oneshot_score") is not None else "")
        figures = ("val acc and top1 come from the supernet's weights" if a.get("top1") is not None
                   else "val acc comes from the supernet's weights, and no test top1: a candidate is tested "
                        "once retrained")
        out.print(f"one-shot estimate: {figures} (no candidate was retrained){ranked}", markup=False,
                  highlight=False)
    elif "retrain_of" in labels:
        out.print(f"retrained from scratch from one-shot candidate {labels['retrain_of']} (its estimate: "
                  f"val acc {fmt(labels.get('oneshot_val_acc'))})", markup=False, highlight=False)
    _print_decision(out, decision)
    return 0


def _oneshot_labels(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """oneshot studies: which figures are estimates, and the candidate a retrained trial came from."""
    a = trial.user_attrs
    if "oneshot_estimate" not in a:
        return {}
    labels: dict[str, Any] = {"estimated": estimated_metrics(a)}
    for key in ("retrain_of", "oneshot_val_acc", "oneshot_top1", "oneshot_val_loss"):
        if key in a:
            labels[key] = a[key]
    return labels


def run_remeasure(args: argparse.Namespace) -> int:
    """Re-measure the study's finalists together on this machine, under the host's latency gate."""
    from workers.finalists import remeasure_finalists
    from workers.latency_gate import LockDirError, NodeGate

    storage = open_storage_arg(args.storage, must_exist=True)
    study = resolve_study(storage, args.study)
    gate = NodeGate(args.lock_dir, pause_training=False)
    try:
        record = remeasure_finalists(study, device=args.device, latency_lock=gate.latency_lock,
                                     accuracy_tolerance=args.accuracy_tolerance, max_count=args.max_finalists)
    except (KeyError, ValueError, LockDirError) as exc:
        raise UsageError(str(exc.args[0]) if exc.args else str(exc)) from None
    finally:
        gate.close()
    if record is None:
        raise UsageError(f"study {study.study_name!r} has no complete trial with a spec to re-measure")
    numbers = {int(n) for n in record["trials"]}
    trials = [t for t in study.get_trials(deepcopy=False) if t.number in numbers]
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    reference = record.get("reference") or {}
    Console().print(_latency_table(
        f"Finalists of {study.study_name} re-measured together on {record['device']} "
        f"(reference {reference.get('name', 'none')})", trials, record))
    return 0


def run_reseed(args: argparse.Namespace) -> int:
    """Re-train the study's top-k by validation accuracy with more training seeds, here; `best` then
    ties on their accuracy intervals (mean ± std) instead of the one-seed tolerance."""
    from workers.finalists import reseed_top_k

    storage = open_storage_arg(args.storage, must_exist=True)
    study = resolve_study(storage, args.study)
    try:
        record = reseed_top_k(study, top_k=args.top_k, seeds=args.seeds, device=args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if record is None:
        raise UsageError(f"study {study.study_name!r} has no complete trial with a spec to re-train")
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    table = Table(title=f"Top {args.top_k} of {study.study_name} re-trained with {args.seeds} seeds")
    for column in ("trial", "val acc by seed", "mean", "std"):
        table.add_column(column, justify="right")
    for number, entry in record["trials"].items():
        by_seed = ", ".join(f"{seed}: {acc:.4f}" for seed, acc in entry["val_acc_by_seed"].items())
        table.add_row(number, by_seed, f"{entry['val_acc_mean']:.4f}", f"{entry['val_acc_std']:.4f}")
    Console().print(table)
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Write the chosen trial's spec.json, weights.safetensors, model.onnx and metrics.json."""
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
    if spec.task == "detection":  # torchvision's detectors: the TorchScript exporter (docs/detection.md)
        from workers.detection_trial import export_detector as export_onnx
    onnx_path = export_onnx(model, out / "model.onnx")
    print(
        f"exported trial {trial.number} of {study.study_name} to {out}: spec.json, "
        f"weights.safetensors, {Path(onnx_path).name}, metrics.json"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `best` and `export` to the `spsa-nas` command."""
    p = subparsers.add_parser("best", help="the Pareto front and the chosen architecture of a study")
    storage_args(p)
    p.add_argument("--latency-budget", type=positive_float, default=None, help="ms")
    p.add_argument("--trial", type=int, default=None, help="show this trial instead")
    p.add_argument("--accuracy-tolerance", type=float, default=ACCURACY_TOLERANCE,
                   help="validation-accuracy differences within this are noise (one seed per trial)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_best)

    p = subparsers.add_parser("remeasure", help="re-measure a study's finalists' latencies together, here")
    storage_args(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: the search's device)")
    p.add_argument("--max-finalists", type=int, default=MAX_FINALISTS, help="the Pareto front first")
    p.add_argument("--accuracy-tolerance", type=float, default=ACCURACY_TOLERANCE,
                   help="also re-measure the trials this close to the best accuracy (they may tie)")
    p.add_argument("--lock-dir", default=None,
                   help="the host's latency lock directory (default: the runners')")
    p.add_argument("--json", action="store_true", help="print the stored record as JSON")
    p.set_defaults(run=run_remeasure)

    p = subparsers.add_parser("reseed", help="re-train a study's top-k with more seeds (accuracy noise)",
                              description="Re-train the top-k complete trials by validation accuracy with "
                                          "more training seeds, here; `best` then ties on their accuracy "
                                          "intervals (mean ± std) instead of the one-seed tolerance.")
    storage_args(p)
    p.add_argument("--top-k", type=int, default=3, help="how many trials, by validation accuracy (default 3)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per trial, its own run included (default 2)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: the search's device)")
    p.add_argument("--json", action="store_true", help="print the stored record as JSON")
    p.set_defaults(run=run_reseed)

    p = subparsers.add_parser("export", help="write a trial's spec.json, weights and model.onnx")
    storage_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, default=None, help="trial number")
    which.add_argument("--best", action="store_true", help="the best trial by the selection rule")
    p.add_argument("--latency-budget", type=positive_float, default=None, help="ms (with --best)")
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact directory of the search")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=run_export)


__all__ = ["decision_lines", "register", "run_best", "run_export", "run_remeasure", "run_reseed"]
