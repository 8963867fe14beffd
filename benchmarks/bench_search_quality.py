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

`--oracle oneshot` replaces the standalone training by the `oneshot` strategy's candidate
evaluation (a cheap oracle, so that many seeds fit): one supernet per (backbone, width) of the
space is trained once per run (`--supernet-epochs`, uniform single-path unless `--sampling`;
`--supernet-cache FILE` keeps the trained weights), and an architecture's accuracy is its
one-shot estimate - its path's weights, BN recalibrated on `--bn-batches` training batches,
validation accuracy - through evaluate_spec with workers.oneshot.path_fit, the candidates' own
code path. Latency is measured for real once per distinct architecture (as a candidate's is) and
kept in the eval cache. The JSON then also gives bootstrap 95 % intervals over seeds of each
sampler's mean final hypervolume and of its ratio to the baseline, and the spread of the
oracle's accuracies across the distinct architectures.

With the interleaved protocol (the default) the latency objective is what a search scores: the
ratio to the reference measured alongside, times one anchor for the whole run (the first
reference time) - not the raw time, which moves with the machine's load between architectures
measured minutes apart (`--latency-figure median` for the raw time). `--dataset synthetic` is
the gratings task of bench_oneshot.py (`--samples`, `--classes`; `--val-fraction 0.3` there),
where architectures' accuracies spread far more than on digits:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_search_quality.py --oracle oneshot \
        --dataset synthetic --val-fraction 0.3 --train-subset 1 --epochs 1 --trials 40 --seeds 20 \
        --samplers auto,nsga2,random --latency-blocks 4 --latency-max-time-s 0.3 \
        --latency-max-warmup-s 0.5 --supernet-cache runs/sq_gratings_supernets.pt \
        --eval-cache runs/sq_gratings_evals_loss.json --out runs/sq_gratings_loss.json

With the oneshot oracle the accuracy objective is, as in a oneshot search, exp(-validation loss)
(`--estimate loss`, the default) or the top-1 estimate (`--estimate accuracy`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from cli_args import count, emit_json, fraction, non_negative, positive

from search_spaces.config import OneshotConfig, SearchConfig
from search_spaces.loading import load_space
from search_spaces.study import create_study, oneshot_score
from search_spaces.suggest import suggest_arch
from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig
from spsa_nas.data import dataset_in_channels, dataset_num_classes
from spsa_nas.evaluate import EvalHooks, Fit, evaluate_spec
from spsa_nas.spec import ArchSpec
from spsa_nas.supernet import Supernet, train_supernet
from workers.oneshot import (
    build_supernet,
    path_fit,
    supernet_bases,
    supernet_key,
    supernet_run,
    supernet_splits,
    uniform_sampler,
)


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


def trials_to_reach(curve: list[float], target: float) -> int | None:
    """The number of trials after which a hypervolume curve first reaches `target` (None: never)."""
    return next((n + 1 for n, hv in enumerate(curve) if hv >= target - 1e-12), None)


def bootstrap_ci(samples: list[list[float]], statistic: Any, reps: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(*columns)` over paired rows: each resample draws
    len(rows) indices with replacement and applies them to every column of `samples` alike (so a
    ratio of two samplers' means keeps each seed's pair together)."""
    n = len(samples[0])
    if n == 0 or any(len(col) != n for col in samples):
        raise ValueError("bootstrap_ci needs non-empty columns of equal length")
    rng = random.Random(seed)
    values = []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        values.append(statistic(*[[col[i] for i in idx] for col in samples]))
    values.sort()
    tail = (1 - level) / 2
    return values[int(tail * reps)], values[min(reps - 1, int((1 - tail) * reps))]


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
                 cache_file: Path | None, fit: Fit | None = None, oracle: dict[str, Any] | None = None,
                 figure: str = "median", estimate: str = "accuracy") -> None:
        self.data, self.train, self.latency, self.figure = data, train, latency, figure
        self.estimate = estimate
        self.cache_file, self.fit = cache_file, fit
        self.results: dict[str, dict[str, float]] = {}
        context: list[Any] = [data.model_dump(mode="json"), train.model_dump(mode="json"),
                              latency.model_dump(mode="json"), torch.__version__]
        if oracle is not None:  # the standalone context stays as it was (its caches stay valid)
            context.append(oracle)
        self.context = json.dumps(context, sort_keys=True)
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
                                   device="cpu", hooks=EvalHooks(latency_cache=self.latency_cache),
                                   fit=self.fit)
            self.evaluations += 1
            self.results[spec_json] = {"val_acc": float(result.val_acc or 0.0),
                                       "val_loss": result.val_loss,
                                       "latency_ms": result.latency.median_ms,
                                       "latency_ratio": result.latency.ratio,
                                       "reference_ms": result.latency.reference_ms,
                                       "top1": float(result.top1 or 0.0),
                                       "seconds": time.perf_counter() - start}
            if self.cache_file is not None:
                self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                self.cache_file.write_text(json.dumps({"context": self.context, "results": self.results}))
        return {**self.results[spec_json], "val_acc": self.accuracy_figure(spec_json),
                "latency_ms": self.latency_figure(spec_json)}

    def accuracy_figure(self, spec_json: str) -> float:
        """The accuracy objective of an evaluated spec: its top-1 accuracy, or (one-shot oracle with
        estimate "loss", the oneshot strategy's default) exp(-validation loss), its oneshot_score."""
        result = self.results[spec_json]
        if self.estimate == "loss" and result.get("val_loss") is None:
            raise RuntimeError(f"{spec_json[:60]}...: its cached evaluation has no validation loss; "
                               "use --estimate accuracy or a fresh --eval-cache")
        # a oneshot search's accuracy objective under this estimate (search_spaces.study.oneshot_score)
        score = oneshot_score(result, SearchConfig(strategy="oneshot",
                                                   oneshot=OneshotConfig(estimate=self.estimate)))
        return float(result["val_acc"]) if score is None else score

    def anchor_ms(self) -> float:
        """The reference time a ratio is scaled by: the first reference measured for this cache (one
        fixed anchor for the whole run, as a study's)."""
        for result in self.results.values():
            if result.get("reference_ms"):
                return float(result["reference_ms"])
        raise RuntimeError("no reference time was measured: --latency-figure ratio needs the "
                           "interleaved protocol with a reference (LatencyConfig.reference_width)")

    def latency_figure(self, spec_json: str) -> float:
        """The latency objective of an evaluated spec: its raw median, or (figure "ratio") its
        interleaved ratio to the reference times the run's anchor - the figure a search scores,
        which does not move with the machine's load as the raw time does."""
        result = self.results[spec_json]
        if self.figure == "median":
            return float(result["latency_ms"])
        if result.get("latency_ratio") is None:
            raise RuntimeError(f"{spec_json[:60]}...: its cached latency has no ratio (measured with the "
                               "simple protocol?); use --latency-figure median or a fresh --eval-cache")
        return float(result["latency_ratio"]) * self.anchor_ms()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A short fingerprint of a state dict's tensors (the eval cache's context for one-shot runs)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def oneshot_oracle(args: argparse.Namespace, data: DataConfig, train: TrainConfig
                   ) -> tuple[Fit, dict[str, Any]]:
    """The one-shot oracle: one trained supernet per (backbone, width) of the space (from
    `--supernet-cache` when it holds this run's supernets, else trained and stored there) and
    evaluate_spec's `fit` on them (workers.oneshot.path_fit: path weights, BN recalibration,
    validation accuracy). Returns the fit and the oracle's description (its context and curves)."""
    space = load_space(args.space)
    cfg = SearchConfig(space=args.space, dataset=data, train=train, strategy="oneshot", device="cpu",
                       oneshot=OneshotConfig(epochs=args.supernet_epochs, bn_batches=args.bn_batches,
                                             sampling=args.sampling))
    epochs = cfg.oneshot.supernet_epochs(train)
    context = {"oracle": "oneshot", "space": space.model_dump(mode="json"), "epochs": epochs,
               "bn_batches": cfg.oneshot.bn_batches, "sampling": cfg.oneshot.sampling,
               "sandwich_paths": cfg.oneshot.sandwich_paths, "data": data.model_dump(mode="json"),
               "train": train.model_dump(mode="json"), "torch": torch.__version__}
    stored: dict[str, Any] = {}
    cache = args.supernet_cache
    if cache is not None and cache.exists():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved.get("context") == json.dumps(context, sort_keys=True):
            stored = saved["supernets"]
        else:
            print(f"--supernet-cache {cache}: trained for another setting; training again",
                  file=sys.stderr, flush=True)
    supernets: dict[str, Supernet] = {}
    described: dict[str, Any] = {}
    for base in supernet_bases(cfg, space):
        key = supernet_key(base.backbone, base.width)
        supernet = build_supernet(cfg, space, base)
        if key in stored:
            supernet.load_state_dict(stored[key]["model"])
            curve, seconds = stored[key]["curve"], stored[key]["seconds"]
        else:
            splits = supernet_splits(cfg, base)
            start = time.perf_counter()
            epochs_run = train_supernet(supernet, uniform_sampler(space, base), splits.train, splits.val,
                                        supernet_run(cfg, space, base, supernet), "cpu")
            seconds = time.perf_counter() - start
            curve = [e.to_dict() for e in epochs_run]
            stored[key] = {"model": supernet.state_dict(), "curve": curve, "seconds": seconds}
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"context": json.dumps(context, sort_keys=True), "supernets": stored}, cache)
            print(f"supernet {key}: {seconds:.1f} s, curve "
                  f"{[round(e['val_acc'], 3) for e in curve]}", file=sys.stderr, flush=True)
        supernets[key] = supernet.eval()
        described[key] = {"curve": curve, "train_s": round(seconds, 1),
                          "digest": state_digest(supernet.state_dict())}

    def supernet_for(spec: ArchSpec) -> Supernet:
        return supernets[supernet_key(spec.backbone, spec.width)]

    oracle = {"oracle": "oneshot", "supernet_epochs": epochs, "bn_batches": cfg.oneshot.bn_batches,
              "sampling": cfg.oneshot.sampling, "supernets": described}
    return path_fit(supernet_for, cfg), oracle


def spread(values: list[float]) -> dict[str, float]:
    """Range, SD and quartiles of the oracle's accuracies across distinct architectures."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"n": len(values), "min": round(min(values), 4), "q1": round(q[0], 4),
            "median": round(q[1], 4), "q3": round(q[2], 4), "max": round(max(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


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
    parser.add_argument("--dataset", default="digits",
                        help="digits (default), synthetic (the gratings task of bench_oneshot.py with "
                             "--samples/--classes), or any dataset name DataConfig accepts")
    parser.add_argument("--samples", type=count(), default=4000,
                        help="synthetic: images in all (default 4000)")
    parser.add_argument("--classes", type=count(2), default=32, help="synthetic: classes (default 32)")
    parser.add_argument("--val-fraction", type=fraction, default=None,
                        help="validation share (default DataConfig's, 0.15)")
    parser.add_argument("--trials", type=count(), default=20)
    parser.add_argument("--seeds", type=count(), default=3)
    parser.add_argument("--samplers", default="auto,random", help="comma-separated; the last is the "
                        "baseline the others are compared with")
    parser.add_argument("--epochs", type=count(), default=1)
    parser.add_argument("--train-subset", type=positive, default=400)
    parser.add_argument("--batch-size", type=count(), default=32)
    parser.add_argument("--latency-repeats", type=count(), default=20)
    parser.add_argument("--latency-blocks", type=count(), default=None,
                        help="interleaved: timed blocks per model (default LatencyConfig's, 12)")
    parser.add_argument("--latency-max-time-s", type=positive, default=None,
                        help="interleaved: time budget of the timed blocks (default LatencyConfig's)")
    parser.add_argument("--latency-max-warmup-s", type=non_negative, default=None,
                        help="interleaved: warm-up budget per model (default LatencyConfig's, 5 s)")
    parser.add_argument("--latency-figure", choices=["ratio", "median"], default=None,
                        help="what the latency objective is: the interleaved ratio to the reference "
                             "measured alongside, times the run's first reference time (what a search "
                             "scores; default with --latency-protocol interleaved), or the raw median")
    parser.add_argument("--latency-protocol", choices=["interleaved", "simple"], default="interleaved",
                        help="LatencyConfig.protocol (default interleaved, a trial's; simple: "
                             "--latency-repeats timed calls after 3 warm-up calls, much cheaper)")
    parser.add_argument("--ref-latency-ms", type=positive, default=None,
                        help="reference latency of the hypervolume (default: median of the run)")
    parser.add_argument("--eval-cache", type=Path, default=None)
    parser.add_argument("--threads", type=count(), default=1, help="torch threads (latency and training)")
    parser.add_argument("--oracle", choices=["standalone", "oneshot"], default="standalone",
                        help="an architecture's accuracy: trained standalone (default) or its one-shot "
                             "estimate on supernets trained once per run")
    parser.add_argument("--supernet-epochs", type=count(), default=None,
                        help="oneshot: supernet epochs (default 2 x --epochs, as the strategy's)")
    parser.add_argument("--bn-batches", type=count(), default=8, help="oneshot: BN recalibration batches")
    parser.add_argument("--sampling", choices=["uniform", "fair", "sandwich"], default="uniform",
                        help="oneshot: supernet paths per step (default uniform, the strategy's)")
    parser.add_argument("--estimate", choices=["loss", "accuracy"], default="loss",
                        help="oneshot: the accuracy objective - exp(-validation loss) (default, the "
                             "strategy's oneshot.estimate) or the top-1 estimate")
    parser.add_argument("--supernet-cache", type=Path, default=None,
                        help="oneshot: keep the trained supernets' weights in this file")
    parser.add_argument("--bootstrap", type=count(), default=2000, help="bootstrap resamples (over seeds)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load_before = os.getloadavg()

    if args.latency_figure == "ratio" and args.latency_protocol != "interleaved":
        parser.error("--latency-figure ratio needs --latency-protocol interleaved (only it measures a "
                     "reference alongside)")
    figure = args.latency_figure or ("ratio" if args.latency_protocol == "interleaved" else "median")
    data = DataConfig(name=args.dataset, train_subset=args.train_subset,
                      **({"synthetic_samples": args.samples, "synthetic_classes": args.classes}
                         if args.dataset == "synthetic" else {}),
                      **({"val_fraction": args.val_fraction} if args.val_fraction is not None else {}))
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size)
    latency = LatencyConfig(repeats=args.latency_repeats, warmup=3, threads=args.threads,
                            protocol=args.latency_protocol,
                            **({"blocks": args.latency_blocks} if args.latency_blocks else {}),
                            **({"max_time_s": args.latency_max_time_s} if args.latency_max_time_s else {}),
                            **({"max_warmup_s": args.latency_max_warmup_s}
                               if args.latency_max_warmup_s is not None else {}))
    oracle: dict[str, Any] | None = None
    fit = None
    if args.oracle == "oneshot":
        fit, oracle = oneshot_oracle(args, data, train)
    estimate = args.estimate if oracle is not None else "accuracy"
    context = None if oracle is None else ({k: v["digest"] for k, v in oracle["supernets"].items()}
                                           | {"bn": args.bn_batches}
                                           # evaluations of the top-1 oracle kept no loss
                                           | ({"estimate": "loss"} if estimate == "loss" else {}))
    evaluate = Evaluator(data, train, latency, args.eval_cache, fit=fit, figure=figure, estimate=estimate,
                         oracle=context)
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
        low, high = bootstrap_ci([finals], statistics.fmean, args.bootstrap)
        summary[sampler] = {"final_hv": [round(v, 4) for v in finals],
                            "mean_final_hv": round(statistics.mean(finals), 4),
                            "mean_final_hv_ci95": [round(low, 4), round(high, 4)]}
    base_finals = [curves[baseline][seed][-1] for seed in range(args.seeds)]
    for sampler in samplers[:-1]:
        needed = [trials_to_reach(curves[sampler][seed], curves[baseline][seed][-1])
                  for seed in range(args.seeds)]
        finals = [curves[sampler][seed][-1] for seed in range(args.seeds)]
        low, high = bootstrap_ci([finals, base_finals],
                                 lambda a, b: statistics.fmean(a) / statistics.fmean(b), args.bootstrap)
        summary[sampler]["ratio_to_" + baseline] = round(
            statistics.fmean(finals) / statistics.fmean(base_finals), 4)
        summary[sampler]["ratio_to_" + baseline + "_ci95"] = [round(low, 4), round(high, 4)]
        summary[sampler]["seeds_at_or_above_" + baseline] = sum(
            1 for a, b in zip(finals, base_finals, strict=True) if a >= b - 1e-12)
        summary[sampler]["trials_to_reach_" + baseline + "_final_hv"] = needed
        reached = [n for n in needed if n is not None]
        summary[sampler]["median_trials_to_reach"] = (statistics.median(reached)
                                                      if len(reached) == len(needed) else None)
        within = sum(1 for n in needed if n is not None and n <= args.trials / 2)
        summary[sampler]["seeds_within_half_the_trials"] = within
        summary[sampler]["share_within_half_the_trials"] = round(within / args.seeds, 4)
        summary[sampler]["seeds_never_reaching"] = len(needed) - len(reached)
    report = {
        "benchmark": "search_quality",
        "mode": ("real trials (each distinct architecture trained and measured once per run)"
                 if oracle is None else "one-shot oracle (each distinct architecture's accuracy its "
                 "one-shot estimate; latency measured once per run)"),
        "oracle": oracle,
        "space": args.space, "dataset": data.model_dump(mode="json"), "trials": args.trials,
        "seeds": args.seeds,
        "epochs": args.epochs, "train_subset": args.train_subset,
        "reference_point": {"val_acc": 0.0, "latency_ms": round(ref, 4)},
        "samplers": summary,
        "hv_curves": {s: {str(k): [round(v, 4) for v in c] for k, c in cs.items()}
                      for s, cs in curves.items()},
        "distinct_architectures_evaluated": evaluate.evaluations,
        "trials_total": args.trials * args.seeds * len(samplers),
        "distinct_architectures_used": len(evaluate.used),
        "val_acc_spread": spread([evaluate.accuracy_figure(k) for k in evaluate.used]),
        "estimate": estimate,
        "latency_ms_spread": spread([evaluate.latency_figure(k) for k in evaluate.used]),
        "latency": {"protocol": args.latency_protocol, "repeats": args.latency_repeats, "warmup": 3,
                    "blocks": latency.blocks, "max_time_s": latency.max_time_s,
                    "max_warmup_s": latency.max_warmup_s, "figure": figure,
                    "anchor_ms": round(evaluate.anchor_ms(), 4) if figure == "ratio" else None},
        # one real trial = build, measure latency, train, validate, test (cached ones: as measured)
        "real_trials_per_minute": trials_per_minute(evaluate),
        "wall_s": round(wall, 1),
        "threads": args.threads,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "torch": torch.__version__,
    }
    emit_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
