"""Ray runner overhead: dispatch cost per trivial trial, throughput with 1 and 2 workers, time in trials."""

from __future__ import annotations

import argparse
import functools
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from cli_args import count, positive

from search_spaces.config import Resources, SearchConfig
from search_spaces.study import create_study
from workers.ray_runner import RunnerOptions, run_search
from workers.synthetic import synthetic_trial


def _run(name: str, url: str, tmp: Path, *, trials: int, parallelism: int, train_s: float,
         options: RunnerOptions, train_s_cycle: tuple[float, ...] = ()) -> dict[str, Any]:
    cfg = SearchConfig(study_name=name, sampler="random", trials=trials, parallelism=parallelism,
                       resources=Resources(num_cpus=1))
    trial_fn = functools.partial(synthetic_trial, train_s=train_s, train_s_cycle=train_s_cycle)
    create_study(cfg, url)
    report = run_search(name, url, artifact_dir=tmp / "artifacts", trial_fn=trial_fn, options=options)
    if report.finished != trials or report.trial_s is None or report.task_s is None:
        raise RuntimeError(f"{name}: {report.finished} of {trials} trials finished: {report}")
    wall = report.elapsed_s
    return {
        "trials": trials,
        "parallelism": parallelism,
        "trial_s": list(train_s_cycle) if train_s_cycle else train_s,
        "wall_s": round(wall, 3),
        "trials_per_s": round(trials / wall, 3),
        "wall_per_trial_ms": round(1000 * wall / trials, 1),
        # time a worker slot spends outside the trial function, per trial (dispatch, ask, tell...)
        "overhead_per_trial_ms": round(1000 * (wall * parallelism - report.trial_s) / trials, 1),
        "task_overhead_per_trial_ms": round(1000 * (report.task_s - report.trial_s) / trials, 1),
        "fraction_in_trials": round(report.trial_s / (wall * parallelism), 3),
        "db_retries": report.db_retries,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trivial-trials", type=count(), default=40, help="trials of the dispatch test")
    parser.add_argument("--trials", type=count(), default=24, help="trials of each throughput test")
    parser.add_argument("--trial-s", type=positive, default=0.5, help="length of a throughput-test trial")
    default_poll_s = RunnerOptions().poll_s
    parser.add_argument("--poll-s", type=positive, default=default_poll_s,
                        help="the coordinator's poll interval (default: the runner's and the service's, "
                             f"{default_poll_s:g} s)")
    parser.add_argument("--storage", default=None, help="database URL (default: a fresh SQLite file)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    import ray

    options = RunnerOptions(heartbeat_s=5.0, lease_s=60.0, poll_s=args.poll_s)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp_dir:
        tmp = Path(tmp_dir)
        url = args.storage or f"sqlite:///{tmp / 'bench.db'}"
        start = time.perf_counter()
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
        ray_init_s = time.perf_counter() - start
        try:
            cpus = ray.cluster_resources().get("CPU", 0)
            # warm-up: start the worker processes and import the project in them
            _run("warmup", url, tmp, trials=4, parallelism=2, train_s=0.0, options=options)
            results = {
                "dispatch_trivial_p1": _run("trivial-p1", url, tmp, trials=args.trivial_trials, parallelism=1,
                                            train_s=0.0, options=options),
                "dispatch_trivial_p2": _run("trivial-p2", url, tmp, trials=args.trivial_trials, parallelism=2,
                                            train_s=0.0, options=options),
                "throughput_p1": _run("sleep-p1", url, tmp, trials=args.trials, parallelism=1,
                                      train_s=args.trial_s, options=options),
                "throughput_p2": _run("sleep-p2", url, tmp, trials=args.trials, parallelism=2,
                                      train_s=args.trial_s, options=options),
                # trials of unequal length (as real ones are): a slot freed early must not idle
                "throughput_p2_unequal": _run("sleep-p2-unequal", url, tmp, trials=args.trials,
                                              parallelism=2, train_s=args.trial_s, options=options,
                                              train_s_cycle=(args.trial_s / 2, 3 * args.trial_s / 2)),
            }
        finally:
            ray.shutdown()
    report = {
        "benchmark": "bench_ray_dispatch",
        "machine": {"cpus": cpus, "python": platform.python_version(), "ray": ray.__version__},
        "storage": "sqlite" if args.storage is None else args.storage.split(":", 1)[0],
        "ray_init_s": round(ray_init_s, 2),
        "poll_s": args.poll_s,
        "note": "trials sleep (no CPU); overhead = worker-slot time outside the trial function per trial",
        **results,
        "speedup_p2_over_p1": round(results["throughput_p2"]["trials_per_s"]
                                    / results["throughput_p1"]["trials_per_s"], 2),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
