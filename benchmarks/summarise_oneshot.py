"""Ranking quality over several draws: bench_oneshot.py outputs (one per draw of architectures) in one JSON.

Each `bench_oneshot.py --seed S` run draws its own architectures and trains its own supernets; a
single draw's tau moves with which 20 architectures it drew (measured: 0.57 to 0.83 for the same
settings). This reads several such outputs and reports, for the ranking by loss (what a oneshot
search ranks by): each draw's tau with its interval, per-supernet taus, spread and seed noise; the
mean tau over the draws with a 95 % interval from a two-level bootstrap (draws resampled, then
architectures within each resampled draw, tau recomputed from the stored pairs); and how many
draws and single supernets reach `--target`. With 4 or more standalone seeds it also sets the
tau beside what a repeat of the standalone trainings gives: the seeds split in two halves (even,
odd), the tau between the halves' means (two independent standalone rankings) beside the one-shot
ranking's tau against each half's mean (their average): where the second reaches the first, the
supernet ranks as well as a repeat of half the standalone trainings would. The runs must share
task, standalone budget and one-shot budget (refused otherwise: a mean over different settings
means nothing).

    .venv/bin/python benchmarks/summarise_oneshot.py runs/oneshot_draw_seed*.json --out runs/draws.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import Any

from cli_args import count, emit_json, positive
from ranking import ci95, seed_noise_sd, tau_interval
from ranking import kendall_tau as _tau

SHARED = ("task", "standalone_budget", "budget", "supernets")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="bench_oneshot.py JSON outputs, one per draw")
    p.add_argument("--target", type=positive, default=0.7, help="the tau to reach (default 0.7)")
    p.add_argument("--bootstrap", type=count(), default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    p.add_argument("--first-seeds", type=count(), default=None,
                   help="take each architecture's standalone truth from its first N seeds only (the runs' "
                        "own figures are then recomputed from the pairs, which hold no per-supernet loss)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p.parse_args(argv)


def _load(path: Path) -> dict[str, Any]:
    try:
        run = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(run, dict) or run.get("benchmark") != "oneshot" or "pairs" not in run:
        raise SystemExit(f"{path}: not an output of bench_oneshot.py")
    return run


def _setting(run: dict[str, Any], key: str) -> Any:
    """A shared setting, without the keys a run leaves None (an older run of the benchmark wrote no
    key for a setting it did not have; a newer one writes None)."""
    value = run.get(key)
    return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value


def _pairs(run: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(-one-shot loss, standalone mean accuracy) per architecture."""
    return ([-p["oneshot_loss"] for p in run["pairs"]],
            [statistics.fmean(p["standalone"]) for p in run["pairs"]])


def _first_seeds(run: dict[str, Any], name: str, n: int, reps: int, seed: int) -> dict[str, Any]:
    """`run` with each architecture's standalone accuracies cut to its first `n` seeds and the
    per-draw figures recomputed from the pairs: tau by loss with a bootstrap interval (architectures
    resampled), the winner in the top 3, spread over noise. Per-supernet taus are left out: the
    pairs hold only the loss averaged over the supernets."""
    fewest = min(len(p["standalone"]) for p in run["pairs"])
    if fewest < n:
        raise SystemExit(f"{name}: --first-seeds {n}, but an architecture there has only {fewest} seeds")
    pairs = [{**p, "standalone": p["standalone"][:n]} for p in run["pairs"]]
    neg, means = _pairs({"pairs": pairs})
    top3 = sorted(range(len(means)), key=lambda i: -means[i])[:3]
    noise = seed_noise_sd([p["standalone"] for p in pairs])
    return {**run, "pairs": pairs, "kendall_tau_loss": _tau(neg, means),
            "kendall_tau_loss_ci95": list(tau_interval(neg, means, reps, seed)),
            "kendall_tau_loss_per_supernet": [],
            "oneshot_loss_winner_in_standalone_top3": max(range(len(neg)), key=neg.__getitem__) in top3,
            "spread_over_noise": statistics.stdev(means) / noise if noise else None}


def _split_half(run: dict[str, Any]) -> dict[str, float | None] | None:
    """A repeat's tau on one draw (None under 4 seeds): the tau between the mean accuracies of the
    even and the odd seeds, and the one-shot loss ranking's mean tau against either half."""
    seeds = [p["standalone"] for p in run["pairs"]]
    if min(len(s) for s in seeds) < 4:
        return None
    halves = [[statistics.fmean(s[parity::2]) for s in seeds] for parity in (0, 1)]
    oneshot = [-p["oneshot_loss"] for p in run["pairs"]]
    against = [_tau(oneshot, half) for half in halves]
    return {"tau_between_halves": _tau(halves[0], halves[1]),
            "loss_tau_vs_halves": statistics.fmean(against) if None not in against else None}


def summarise(runs: list[dict[str, Any]], names: list[str], *, target: float, reps: int,
              seed: int, first_seeds: int | None = None) -> dict[str, Any]:
    first = runs[0]
    for run, name in zip(runs[1:], names[1:], strict=True):
        for key in SHARED:
            if _setting(run, key) != _setting(first, key):
                raise SystemExit(f"{name}: its {key} differs from {names[0]}'s: the draws must share "
                                 "task, standalone budget and one-shot budget")
    if first_seeds is not None:  # each draw's interval from the same seed, as bench_oneshot's
        runs = [_first_seeds(run, name, first_seeds, reps, seed)
                for run, name in zip(runs, names, strict=True)]
    draws = []
    for run, name in zip(runs, names, strict=True):
        draws.append({"run": name, "archs": run["archs"], "kendall_tau_loss": run["kendall_tau_loss"],
                      "kendall_tau_loss_ci95": run["kendall_tau_loss_ci95"],
                      "kendall_tau_loss_per_supernet": run["kendall_tau_loss_per_supernet"],
                      "oneshot_loss_winner_in_standalone_top3": run["oneshot_loss_winner_in_standalone_top3"],
                      "spread_over_noise": run["spread_over_noise"],
                      "seed_to_seed_tau": run["seed_to_seed_tau"],
                      "split_half": _split_half(run)})
    taus = [d["kendall_tau_loss"] for d in draws]
    defined = [t for t in taus if t is not None]
    singles = [t for d in draws for t in d["kendall_tau_loss_per_supernet"] if t is not None]
    pairs = [_pairs(run) for run in runs]
    rng = random.Random(seed)
    means = []
    for _ in range(reps):
        resampled = []
        for _ in pairs:
            x, y = pairs[rng.randrange(len(pairs))]
            idx = [rng.randrange(len(x)) for _ in x]
            tau = _tau([x[i] for i in idx], [y[i] for i in idx])
            if tau is not None:
                resampled.append(tau)
        if resampled:
            means.append(statistics.fmean(resampled))
    return {
        "summary": "oneshot ranking over draws",
        "target": target,
        "draws": draws,
        "mean_kendall_tau_loss": statistics.fmean(defined) if defined else None,
        "mean_kendall_tau_loss_ci95": list(ci95(means)),
        "range_kendall_tau_loss": [min(defined), max(defined)] if defined else None,
        "draws_at_target": sum(t >= target for t in defined),
        "single_supernets_at_target": sum(t >= target for t in singles),
        "single_supernets": len(singles),
        "mean_single_supernet_tau": statistics.fmean(singles) if singles else None,
        "winner_in_top3": sum(bool(d["oneshot_loss_winner_in_standalone_top3"]) for d in draws),
        # draws whose one-shot ranking matches a repeat of half the standalone seeds (4+ seeds)
        "draws_matching_a_repeat": sum(
            c["loss_tau_vs_halves"] >= c["tau_between_halves"] for d in draws
            if (c := d["split_half"]) and None not in c.values()),
        "settings": {key: _setting(first, key) for key in SHARED},
        "standalone_seeds_used": first_seeds or "all",
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _args(argv)
    runs = [_load(p) for p in args.runs]
    result = summarise(runs, [str(p) for p in args.runs], target=args.target, reps=args.bootstrap,
                       seed=args.seed, first_seeds=args.first_seeds)
    emit_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
