"""One-shot search end to end through REST: 100 candidates against a few standalone trials, in one run.

A real `spsa-nas serve` (a free port, a temporary data directory with its SQLite database, Ray
started by its coordinator) gets, one after the other:

0. an untimed warm-up: a standalone search of `--warmup-trials` (default 2) 1-epoch trials, so that
   the timed searches both find the coordinator's Ray and its worker processes started (without it
   the first timed search alone waited for the coordinator's `ray.init` and its workers' imports);
1. a `oneshot` search on the `quick` space with digits and `--trials` candidates (default 100),
   `retrain_top_k` `--retrain` (default 3); polled until it ends, recording when each phase
   (supernet, candidates, retrain, done) was first seen; then its best architecture is downloaded
   (`/best`, `/best/weights`), rebuilt with `spsa_nas.build_model(spec, weights=...)` and run on the
   digits validation split;
2. a `standalone` search of the same space, data, recipe and latency settings with `--standalone`
   trials (default 5), through the same path.

Printed as JSON: each search's wall time (submit to completed, client side; and the server's
started..finished), the CPU seconds the server's processes used meanwhile by kind (API, coordinator,
Ray's task workers, Ray's own processes; from /proc) and how busy that kept the cores, the one-shot
phases' times, the total training epochs of each (supernet epochs
+ retrained trials' epochs, against the standalone trials' epochs), and the ratios. The cost of
100 standalone trainings is EXTRAPOLATED from the measured per-trial mean of the `--standalone`
trials (wall: the standalone search's wall time / its trials x `--trials`; epochs: exact, each
standalone trial trains `train.epochs`), and the JSON says so. os.getloadavg() before and after:
the machine is shared, wall times move with its load.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_oneshot_rest.py --out runs/oneshot_rest.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from cli_args import count, emit_json, non_negative, positive
from safetensors.torch import load

from service.testing import Server, add_user, child_pids
from spsa_nas import ArchSpec, build_model
from spsa_nas.config import DataConfig
from spsa_nas.data import load_data
from spsa_nas.train import evaluate_accuracy

TERMINAL = ("completed", "failed", "cancelled", "timeout")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=count(), default=100, help="oneshot candidates (default 100)")
    p.add_argument("--standalone", type=count(), default=5, help="standalone trials timed (default 5)")
    p.add_argument("--retrain", type=count(0), default=3, help="oneshot retrain_top_k (default 3)")
    p.add_argument("--epochs", type=count(), default=2, help="train.epochs of a standalone trial (default 2)")
    p.add_argument("--oneshot-epochs", type=count(), default=None,
                   help="oneshot.epochs per supernet (default: the strategy's, 2 x --epochs)")
    p.add_argument("--batch-size", type=count(), default=64)
    p.add_argument("--parallelism", type=count(), default=2, help="trials in flight (default 2: 2 cores)")
    p.add_argument("--latency-protocol", choices=["interleaved", "simple"], default="interleaved",
                   help="latency.protocol of every trial (default interleaved, the config's default; simple: "
                        "warm-up and --latency-repeats single calls, no reference, no time budget)")
    p.add_argument("--latency-repeats", type=count(), default=3, help="latency.repeats (default 3)")
    p.add_argument("--latency-warmup", type=count(0), default=1, help="latency.warmup (default 1)")
    p.add_argument("--latency-max-time", type=positive, default=1.0,
                   help="latency.max_time_s of every trial (default 1 s; the config's default, 15 s, "
                        "with its warm-up and reference model, makes a candidate's latency ~30 s here)")
    p.add_argument("--latency-blocks", type=count(), default=4, help="latency.blocks (default 4)")
    p.add_argument("--latency-max-warmup", type=non_negative, default=0.5,
                   help="latency.max_warmup_s (default 0.5)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the server's data directory (default: a temporary one, removed after)")
    p.add_argument("--warmup-trials", type=count(0), default=2,
                   help="an untimed standalone search of this many 1-epoch trials first (default 2), so "
                        "that both timed searches find the coordinator's Ray and its worker processes "
                        "started, as on a server that has run a search before; 0: none (then the first "
                        "timed search, the oneshot one, pays the start alone)")
    p.add_argument("--timeout", type=positive, default=3600, help="seconds to wait for each search")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p.parse_args(argv)


def _latency(args: argparse.Namespace) -> dict[str, Any]:
    return {"protocol": args.latency_protocol, "repeats": args.latency_repeats, "warmup": args.latency_warmup,
            "max_time_s": args.latency_max_time, "blocks": args.latency_blocks,
            "max_warmup_s": args.latency_max_warmup}


def _body(args: argparse.Namespace, strategy: str, trials: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "space": "quick", "dataset": {"name": "digits"}, "trials": trials, "strategy": strategy,
        "parallelism": args.parallelism,
        "train": {"epochs": args.epochs, "batch_size": args.batch_size},
        "latency": _latency(args),
    }
    if strategy == "oneshot":
        body["retrain_top_k"] = args.retrain
        if args.oneshot_epochs is not None:
            body["oneshot"] = {"epochs": args.oneshot_epochs}
    return body


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_snapshot(server: Server) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of the server's API process and every process below it, by
    pid, with its kind: `api`, `coordinator`, `ray_workers` (the processes that run tasks:
    `ray::...`) or `ray_system` (gcs, raylet, dashboard and the other processes of the
    coordinator's Ray). A process that ends while it is read is left out."""
    coordinator = server.coordinator_pid()
    tree, frontier = [server.api_pid], [server.api_pid]
    while frontier:
        frontier = [child for pid in frontier for child in child_pids(pid)]
        tree += frontier
    out: dict[int, tuple[str, float]] = {}
    for pid in tree:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        kind = ("api" if pid == server.api_pid else "coordinator" if pid == coordinator
                else "ray_workers" if cmdline.startswith("ray::") else "ray_system")
        out[pid] = (kind, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)  # utime + stime
    return out


def _cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
              wall_s: float) -> dict[str, Any]:
    """CPU seconds each kind of the server's processes used between two snapshots (a process
    started in between counts from 0; one that ended in between is missed), and how busy that kept
    the machine's cores."""
    used: dict[str, float] = {}
    for pid, (kind, seconds) in after.items():
        used[kind] = used.get(kind, 0.0) + seconds - (before.get(pid) or (kind, 0.0))[1]
    cores = os.cpu_count() or 1
    return {"cpu_s": {k: round(v, 1) for k, v in sorted(used.items())}, "cores": cores,
            "busy_fraction": round(sum(used.values()) / (wall_s * cores), 3)}


def _run(client: httpx.Client, server: Server, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Submit, poll until the search ends; the last answer, the client's wall time, when each
    phase was first seen (seconds since the submit) and the CPU time the server's processes used."""
    cpu_before = _cpu_snapshot(server)
    start = time.monotonic()
    created = client.post("/api/v1/searches", json=body)
    if created.status_code != 201:
        raise SystemExit(f"submit refused ({created.status_code}): {created.text}")
    url = created.json()["links"]["self"]
    phases: dict[str, float] = {}
    answer: dict[str, Any] = {}
    while time.monotonic() - start < timeout_s:
        answer = client.get(url).json()
        phase = (answer.get("progress") or {}).get("phase")
        if phase is not None and phase not in phases:
            phases[phase] = time.monotonic() - start
            print(f"{body['strategy']}: phase {phase} at {phases[phase]:.1f} s", file=sys.stderr)
        if answer["status"] in TERMINAL:
            break
        time.sleep(0.5)
    else:
        raise SystemExit(f"the {body['strategy']} search did not end within {timeout_s} s; last "
                         f"answer {answer}\n{server.log()}")
    wall = time.monotonic() - start
    cpu = _cpu_used(cpu_before, _cpu_snapshot(server), wall)
    if answer["status"] != "completed":
        raise SystemExit(f"the {body['strategy']} search ended {answer['status']}: {answer.get('error')}"
                         f"\n{server.log()}")
    trials: list[dict[str, Any]] = []
    while len(trials) < answer["progress"]["finished"] + answer["progress"]["failed"]:
        page = client.get(f"{url}/trials", params={"skip": len(trials), "limit": 500}).json()
        if not page["data"]:
            break
        trials += page["data"]
    return {"url": url, "answer": answer, "wall_s": wall, "phases_seen_at_s": phases, "trials": trials,
            "cpu": cpu}


def _server_wall(answer: dict[str, Any]) -> float | None:
    from datetime import datetime

    if not answer.get("started_at") or not answer.get("finished_at"):
        return None
    started, finished = (datetime.fromisoformat(answer[k]) for k in ("started_at", "finished_at"))
    return (finished - started).total_seconds()


def _rebuild_best(client: httpx.Client, url: str, batch_size: int) -> dict[str, Any]:
    """The best architecture downloaded, rebuilt from its spec and weights, and validated."""
    best = client.get(f"{url}/best").json()
    weights = client.get(f"{url}/best/weights")
    if weights.status_code != 200:
        raise SystemExit(f"best/weights: {weights.status_code} {weights.text[:500]}")
    spec = ArchSpec.model_validate(best["spec"])
    model = build_model(spec, weights=load(weights.content)).eval()
    report = model.load_report
    splits = load_data(DataConfig(name="digits"), spec.input_size, spec.in_channels)
    acc = evaluate_accuracy(model, splits.val, "cpu", topk=(1,), batch_size=max(batch_size, 256))[1]
    return {"trial": best["trial"], "spec": best["spec"], "reported_val_acc": best["metrics"].get("val_acc"),
            "rebuilt_val_acc": acc, "estimated": best["metrics"].get("estimated"),
            "weights_bytes": len(weights.content),
            "load_report_clean": not report.initialised and not report.mismatched}


def _epochs(trials: list[dict[str, Any]]) -> float:
    return float(sum(t["metrics"].get("epochs") or 0 for t in trials if t["state"] == "COMPLETE"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-oneshot-rest-")) / "data"
    token = add_user(data_dir, "bench")
    server = Server(data_dir).start()
    try:
        client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        warmup = None
        if args.warmup_trials:
            body = _body(args, "standalone", args.warmup_trials)
            body["train"]["epochs"] = 1
            warmup = _run(client, server, body, args.timeout)
        oneshot = _run(client, server, _body(args, "oneshot", args.trials), args.timeout)
        best = _rebuild_best(client, oneshot["url"], args.batch_size)
        load_middle = os.getloadavg()
        alone = _run(client, server, _body(args, "standalone", args.standalone), args.timeout)
    finally:
        server.stop()
    if args.data_dir is None:
        shutil.rmtree(data_dir.parent, ignore_errors=True)

    answer = oneshot["answer"]
    supernets = answer["progress"].get("supernet") or {}
    supernet_epochs = float(sum(r.get("epoch") or 0 for r in supernets.values()))
    retrained = [t for t in oneshot["trials"] if t["metrics"].get("epochs")]
    retrain_epochs = _epochs(retrained)
    seen = oneshot["phases_seen_at_s"]
    order = [p for p in ("supernet", "candidates", "retrain", "done") if p in seen]
    phase_s = {p: (seen[order[i + 1]] if i + 1 < len(order) else oneshot["wall_s"]) - seen[p]
               for i, p in enumerate(order) if p != "done"}
    alone_epochs = _epochs(alone["trials"])
    per_trial_s = alone["wall_s"] / args.standalone
    extrapolated_s = per_trial_s * args.trials
    extrapolated_epochs = alone_epochs / args.standalone * args.trials
    one_epochs = supernet_epochs + retrain_epochs
    result = {
        "benchmark": "oneshot_rest",
        "space": "quick", "dataset": "digits", "candidates": args.trials, "retrain_top_k": args.retrain,
        "train_epochs": args.epochs, "batch_size": args.batch_size, "parallelism": args.parallelism,
        "latency": _latency(args),
        "warmup": None if warmup is None else {
            "trials": args.warmup_trials, "wall_s": warmup["wall_s"],
            "note": "an untimed 1-epoch standalone search run first, so that neither timed search pays "
                    "the coordinator's Ray start or its workers' first imports"},
        "oneshot": {
            "wall_s": oneshot["wall_s"], "server_wall_s": _server_wall(answer),
            "phases_s": phase_s, "phases_seen_at_s": seen, "cpu": oneshot["cpu"],
            "supernets": {k: {"epochs": r.get("epoch"), "done": r.get("done"),
                              "curve_val_acc": [c.get("val_acc") for c in r.get("curve") or []],
                              "train_s": sum(c.get("seconds") or 0 for c in r.get("curve") or [])}
                          for k, r in supernets.items()},
            "candidates_evaluated": sum(1 for t in oneshot["trials"]
                                        if t["state"] == "COMPLETE" and not t["metrics"].get("epochs")),
            "retrained": len(retrained),
            "train_epochs": {"supernet": supernet_epochs, "retrain": retrain_epochs, "total": one_epochs},
            "summary": answer.get("summary"),
        },
        "best_rebuilt": best,
        "standalone": {
            "trials": args.standalone, "wall_s": alone["wall_s"], "cpu": alone["cpu"],
            "server_wall_s": _server_wall(alone["answer"]),
            "wall_s_per_trial": per_trial_s, "train_epochs": alone_epochs,
            "mean_trial_s": alone["answer"]["progress"].get("mean_trial_s"),
        },
        "oneshot_wall_over_standalone_wall": oneshot["wall_s"] / alone["wall_s"],
        "extrapolated": {
            "note": f"{args.trials} standalone trials NOT run: extrapolated from the measured "
                    f"{args.standalone} (wall: their search's wall time / {args.standalone} x {args.trials}; "
                    "epochs: train.epochs each)",
            "standalone_wall_s": extrapolated_s, "standalone_train_epochs": extrapolated_epochs,
            "wall_ratio": extrapolated_s / oneshot["wall_s"],
            "epochs_ratio": extrapolated_epochs / one_epochs if one_epochs else None,
        },
        "loadavg_before": load_before, "loadavg_between": load_middle, "loadavg_after": os.getloadavg(),
    }
    emit_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
