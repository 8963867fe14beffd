"""`spsa-nas best` and `spsa-nas export`: a study's Pareto front and chosen architecture, and its files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
from rich.console import Console

from search_spaces.study import describe_spec, pareto_front, select_best, trial_counts
from workers.cli import UsageError
from workers.cli.common import (
    DEFAULT_ARTIFACTS,
    fmt,
    front_table,
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


def run_best(args: argparse.Namespace) -> int:
    """Print the Pareto front and the chosen trial (or their JSON with --json)."""
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
    out.print(front_table(f"Pareto front of {study.study_name}", front, trial.number))
    a = trial.user_attrs
    out.print(
        f"best: trial {trial.number}: val acc {fmt(a.get('val_acc'))}, test top1 "
        f"{fmt(a.get('top1'))}, {fmt(a.get('latency_ms'), '.3f')} ms, "
        f"{fmt(a.get('params'), ',')} params",
        markup=False,
        highlight=False,
    )
    out.print(describe_spec(a.get("spec") or {}), markup=False, highlight=False)
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
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_best)

    p = subparsers.add_parser("export", help="write a trial's spec.json, weights and model.onnx")
    storage_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, default=None, help="trial number")
    which.add_argument("--best", action="store_true", help="the best trial by the selection rule")
    p.add_argument("--latency-budget", type=positive_float, default=None, help="ms (with --best)")
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact directory of the search")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=run_export)


__all__ = ["register", "run_best", "run_export"]
