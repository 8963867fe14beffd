"""Search-quality benchmark: Pareto hypervolume of the default sampler vs random search (JSON out).

Real trials on a real search space (default: `quick` on the digits data): every proposed
architecture is built, its latency measured, trained and validated with `spsa_nas.evaluate_spec`.
Each *distinct* architecture is evaluated once per benchmark run and the result reused when any
sampler/seed proposes it again (training is seeded, so a re-run would give the same accuracy,
and re-measuring latency would only add noise between samplers); `--eval-cache FILE` keeps these
evaluations across runs. For each sampler and seed, the same number of trials; after every
trial the 2-D hypervolume of the front (validation accuracy up, median latency down) against the
fixed reference point (accuracy 0, latency `--ref-latency-ms`; default: the median latency of
the distinct architectures evaluated in the run, the same point for every sampler and seed, so
that the measure rewards fronts in the fast half of the space and one slow outlier measurement
cannot dominate it), divided by the reference latency (1.0 = accuracy 1 at 0 ms).

    .venv/bin/python benchmarks/bench_search_quality.py --trials 20 --seeds 3 --epochs 1 \\
        --train-subset 1 --eval-cache runs/bench_evals.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from search_spaces.config import SearchConfig
from search_spaces.loading import load_space
from search_spaces.study import create_study
from search_spaces.suggest import suggest_arch
from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig
from spsa_nas.data import dataset_in_channels, dataset_num_classes
from spsa_nas.evaluate import EvalHooks, evaluate_spec


def hypervolume_2d(points: list[tuple[float, float]], ref_latency_ms: float) -> float:
    """Area dominated by (accuracy, latency) points, maximising accuracy from 0, minimising latency
    up to `ref_latency_ms`: the staircase sum over the points sorted by latency."""
    area, best = 0.0, 0.0
    for acc, lat in sorted(points, key=lambda p: (p[1], -p[0])):
        if lat >= ref_latency_ms or acc <= best:
            continue
        area += (acc - best) * (ref_latency_ms - lat)
        best = acc
    return area


class MemoryLatencyCache:
    """An in-process latency cache (the benchmark's; runners use the study's storage)."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.data[key] = value


class Evaluator:
    """Evaluates each distinct spec once; counts real evaluations and their time."""

    def __init__(self, data: DataConfig, train: TrainConfig, latency: LatencyConfig,
                 cache_file: Path | None) -> None:
        self.data, self.train, self.latency = data, train, latency
        self.cache_file = cache_file
        self.results: dict[str, dict[str, float]] = {}
        self.context = json.dumps([data.model_dump(mode="json"), train.model_dump(mode="json"),
                                   latency.model_dump(mode="json"), torch.__version__], sort_keys=True)
        if cache_file is not None and cache_file.exists():
            stored = json.loads(cache_file.read_text())
            if stored.get("context") == self.context:
                self.results = stored["results"]
        self.latency_cache = MemoryLatencyCache()
        self.evaluations = 0
        self.used: set[str] = set()

    def __call__(self, spec_json: str, spec: Any) -> dict[str, float]:
        self.used.add(spec_json)
        if spec_json not in self.results:
            start = time.perf_counter()
            result = evaluate_spec(spec, data=self.data, train=self.train, latency=self.latency,
                                   device="cpu", hooks=EvalHooks(latency_cache=self.latency_cache))
            self.evaluations += 1
            self.results[spec_json] = {"val_acc": float(result.val_acc or 0.0),
                                       "latency_ms": result.latency.median_ms,
                                       "top1": float(result.top1 or 0.0),
                                       "seconds": time.perf_counter() - start}
            if self.cache_file is not None:
                self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                self.cache_file.write_text(json.dumps({"context": self.context, "results": self.results}))
        return self.results[spec_json]


def trials_per_minute(evaluate: Evaluator) -> float | None:
    """Real trials per minute over the distinct architectures of this run whose time is known."""
    timed = [evaluate.results[k]["seconds"] for k in evaluate.used if "seconds" in evaluate.results[k]]
    return round(60 * len(timed) / sum(timed), 2) if timed and sum(timed) > 0 else None


def run_sampler(sampler: str, seed: int, args: argparse.Namespace, evaluate: Evaluator
                ) -> list[tuple[float, float]]:
    """The (val_acc, latency_ms) of each trial, in order, for one sampler and seed."""
    cfg = SearchConfig(study_name=f"bench-{sampler}-{seed}", space=args.space, trials=args.trials,
                       sampler=sampler, seed=seed, dataset=evaluate.data, train=evaluate.train,
                       latency=evaluate.latency, device="cpu")
    space = load_space(args.space)
    study = create_study(cfg, optuna.storages.InMemoryStorage(), space=space)
    classes, channels = dataset_num_classes(evaluate.data), dataset_in_channels(evaluate.data)
    points = []
    for _ in range(args.trials):
        trial = study.ask()
        spec = suggest_arch(trial, space, num_classes=classes, in_channels=channels)
        metrics = evaluate(spec.model_dump_json(), spec)
        study.tell(trial, [metrics["val_acc"], metrics["latency_ms"]])
        points.append((metrics["val_acc"], metrics["latency_ms"]))
        print(f"{sampler} seed {seed} trial {trial.number}: acc {metrics['val_acc']:.4f} "
              f"lat {metrics['latency_ms']:.3f} ms", file=sys.stderr, flush=True)
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="quick")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samplers", default="auto,random", help="comma-separated; the last is the "
                        "baseline the others are compared with")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-subset", type=float, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--ref-latency-ms", type=float, default=None,
                        help="reference latency of the hypervolume (default: median of the run)")
    parser.add_argument("--eval-cache", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (latency and training)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    data = DataConfig(name=args.dataset, train_subset=args.train_subset)
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size)
    latency = LatencyConfig(repeats=args.latency_repeats, warmup=3, threads=args.threads)
    evaluate = Evaluator(data, train, latency, args.eval_cache)
    samplers = args.samplers.split(",")
    baseline = samplers[-1]
    start = time.perf_counter()
    runs: dict[str, dict[int, list[tuple[float, float]]]] = {s: {} for s in samplers}
    for seed in range(args.seeds):
        for sampler in samplers:
            runs[sampler][seed] = run_sampler(sampler, seed, args, evaluate)
    wall = time.perf_counter() - start

    distinct = {p for r in runs.values() for pts in r.values() for p in pts}
    ref = args.ref_latency_ms or statistics.median(lat for _, lat in distinct)

    def curve(points: list[tuple[float, float]]) -> list[float]:  # normalised: 1.0 = acc 1 at 0 ms
        return [hypervolume_2d(points[: n + 1], ref) / ref for n in range(len(points))]

    curves = {s: {seed: curve(pts) for seed, pts in r.items()} for s, r in runs.items()}
    summary: dict[str, Any] = {}
    for sampler in samplers:
        finals = [c[-1] for c in curves[sampler].values()]
        summary[sampler] = {"final_hv": [round(v, 4) for v in finals],
                            "mean_final_hv": round(statistics.mean(finals), 4)}
    for sampler in samplers[:-1]:
        needed = []
        for seed in range(args.seeds):
            target = curves[baseline][seed][-1]
            reach = next((n + 1 for n, hv in enumerate(curves[sampler][seed]) if hv >= target - 1e-12),
                         None)
            needed.append(reach)
        summary[sampler]["ratio_to_" + baseline] = round(
            summary[sampler]["mean_final_hv"] / summary[baseline]["mean_final_hv"], 4)
        summary[sampler]["trials_to_reach_" + baseline + "_final_hv"] = needed
        reached = [n for n in needed if n is not None]
        summary[sampler]["median_trials_to_reach"] = (statistics.median(reached)
                                                      if len(reached) == len(needed) else None)
        summary[sampler]["seeds_within_half_the_trials"] = sum(
            1 for n in needed if n is not None and n <= args.trials / 2)
    report = {
        "benchmark": "search_quality",
        "mode": "real trials (each distinct architecture trained and measured once per run)",
        "space": args.space, "dataset": args.dataset, "trials": args.trials, "seeds": args.seeds,
        "epochs": args.epochs, "train_subset": args.train_subset,
        "reference_point": {"val_acc": 0.0, "latency_ms": round(ref, 4)},
        "samplers": summary,
        "hv_curves": {s: {str(k): [round(v, 4) for v in c] for k, c in cs.items()}
                      for s, cs in curves.items()},
        "distinct_architectures_evaluated": evaluate.evaluations,
        "trials_total": args.trials * args.seeds * len(samplers),
        "distinct_architectures_used": len(evaluate.used),
        # one real trial = build, measure latency, train, validate, test (cached ones: as measured)
        "real_trials_per_minute": trials_per_minute(evaluate),
        "wall_s": round(wall, 1),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
