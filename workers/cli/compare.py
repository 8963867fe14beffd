"""`spsa-nas compare`: a study's ablation table (search_spaces.compare) as text tables or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from search_spaces.compare import DIMENSIONS, compare_study
from workers.cli import UsageError
from workers.cli.common import fmt, open_storage_arg, resolve_study, storage_args


def print_tables(summary: dict[str, Any], out: Console) -> None:
    """One table per choice dimension (rows: scope and choice), then how cells count."""
    counts = summary["counts"]
    out.print(
        f"{summary['study']}: {counts['summarised']} completed trials summarised; not summarised: "
        f"{counts['pruned']} pruned, {counts['fail']} failed, {counts['running']} running, "
        f"{counts['waiting']} waiting, {counts['complete_without_metrics']} complete without a spec or "
        "accuracy", markup=False, highlight=False)
    for dimension, title in DIMENSIONS.items():
        cells = [c for c in summary["cells"] if c["dimension"] == dimension]
        if not cells:
            continue
        table = Table(title=title)
        for column in ("scope", "choice", "n", "acc", "± std", "top1", "ms", "re-m", "1st ms"):
            table.add_column(column, justify="left" if column in ("scope", "choice") else "right",
                             no_wrap=True)
        previous = None
        for c in cells:
            table.add_row(c["scope"] if c["scope"] != previous else "", c["choice"], str(c["n"]),
                          fmt(c["val_acc_mean"]), fmt(c["val_acc_std"]), fmt(c["top1_mean"]),
                          fmt(c["latency_ms_mean"], ".3f"), str(c["n_remeasured"]),
                          fmt(c["latency_first_pass_ms_mean"], ".3f"))
            previous = c["scope"]
        out.print(table)
    out.print(f"acc: mean {summary['accuracy']} (± its sample std), top1: mean test top-1; ms: mean "
              "latency, re-m of the trials re-measured as finalists; 1st ms: mean first-pass latency",
              markup=False, highlight=False)
    if summary["estimated"]:
        out.print(f"{summary['estimated']} of the trials' accuracies are one-shot (supernet) estimates",
                  markup=False, highlight=False)
    out.print(summary["counting"], markup=False, highlight=False)
    out.print(summary["latency"], markup=False, highlight=False)


def run_compare(args: argparse.Namespace) -> int:
    """Print the study's ablation table (or its JSON with --json)."""
    storage = open_storage_arg(args.storage, must_exist=True)
    if args.study_name and args.study and args.study_name != args.study:
        raise UsageError(f"two study names: {args.study_name!r} and --study {args.study!r}; pass one")
    study = resolve_study(storage, args.study_name or args.study)
    summary = compare_study(study)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_tables(summary, Console())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `compare` to the `spsa-nas` command."""
    p = subparsers.add_parser(
        "compare", help="a study's completed trials by choice (SPSA vs NL vs GC, reverse, similarity, "
        "channel attention): n, mean accuracy and latency per cell")
    storage_args(p)
    p.add_argument("study_name", nargs="?", default=None, metavar="STUDY",
                   help="study name (or --study; default: the only one there)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_compare)
