"""Where a oneshot candidate's time goes: a local oneshot search under cProfile, per-step totals as JSON.

A `spsa-nas search --strategy oneshot` on `quick` with digits (`--trials` candidates, no
retraining, the cheap latency settings of bench_oneshot_rest.py, `--latency-protocol` theirs) in
this process under cProfile; prints the cumulative seconds of run_trial (all candidates), its ONNX
export, evaluate_spec, measure_latency, BN recalibration and the supernet training, and per
candidate; with `--top N` also the N functions of the most cumulative time under run_trial's
callees (any module: where the rest of a candidate's time goes).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_oneshot_candidates.py --trials 8
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
from pathlib import Path

from cli_args import count

STEPS = ("run_trial", "_export_onnx", "evaluate_spec", "measure_latency", "recalibrate_bn",
         "train_one_supernet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=count(), default=8, help="candidates (default 8)")
    parser.add_argument("--latency-protocol", choices=["interleaved", "simple"], default="interleaved",
                        help="latency.protocol (default interleaved)")
    parser.add_argument("--top", type=count(0), default=0,
                        help="also list this many functions by cumulative time (default 0)")
    args = parser.parse_args(argv)
    from service.cli import main as cli

    with tempfile.TemporaryDirectory(prefix="spsa-prof-") as tmp:
        argv = ["search", "--space", "quick", "--dataset", "digits", "--strategy", "oneshot",
                "--trials", str(args.trials), "--epochs", "2", "--retrain-top-k", "0",
                "--latency.repeats", "3", "--latency.warmup", "1", "--latency.max-time-s", "1",
                "--latency.blocks", "4", "--latency.max-warmup-s", "0.5",
                "--latency.protocol", args.latency_protocol, "--device", "cpu",
                "--storage", f"sqlite:///{Path(tmp) / 's.db'}", "--artifacts", str(Path(tmp) / "art"),
                "--no-remeasure"]
        load_before = os.getloadavg()
        profile = cProfile.Profile()
        stdout, sys.stdout = sys.stdout, sys.stderr  # the CLI's tables go to stderr, the JSON to stdout
        try:
            rc = profile.runcall(cli, argv)
        finally:
            sys.stdout = stdout
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    ours = ("workers", "spsa_nas")
    cumulative = {step: round(sum(v[3] for k, v in stats.items()
                                  if k[2] == step and any(p in k[0] for p in ours)), 2) for step in STEPS}
    top = sorted(((v[3], f"{Path(k[0]).name}:{k[1]}:{k[2]}") for k, v in stats.items()), reverse=True)
    print(json.dumps({"trials": args.trials, "rc": rc, "latency_protocol": args.latency_protocol,
                      "cumulative_s": cumulative,
                      "top_cumulative_s": [[name, round(t, 2)] for t, name in top[: args.top]],
                      "per_candidate_s": {k: round(v / args.trials, 2) for k, v in cumulative.items()
                                          if k != "train_one_supernet"},
                      "loadavg_before": load_before, "loadavg_after": os.getloadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
