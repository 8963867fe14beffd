"""Latency repeatability benchmark: the same 8 architectures measured in fresh processes (JSON out).

Eight architectures of the `quick` space (ResNet-18, CIFAR stem, 16x16 digits input, widths 0.25
and 0.5, with and without SE/ECA/CBAM/SPSA), each process measuring all eight in turn, `--runs`
fresh processes one after the other, for each protocol:

- `before`: the first protocol, with the old LatencyConfig defaults (5 warm-up calls, the median
  of 30 single calls, torch's default thread count);
- `after`: the interleaved protocol with the current LatencyConfig defaults, each architecture
  interleaved with the space's reference (what a trial does);
- `after_together`: the eight measured side by side in one measure_group call with the reference
  (what the finalists re-measurement at the end of a search does);
- with `--under-training`, `after` and `after_together` again while another process trains a model
  under the latency gate (workers.latency_gate.NodeGate: the trainer pauses at its next step while
  a measurement holds the gate, as a trial's training does under the Ray runner).

Per protocol: per architecture the coefficient of variation across runs of the time and of the
reference ratio, Kendall's tau between every two runs' rankings, and the share of re-measurements
(runs 2..n) within 5 % of the first run. The machine's load average (os.getloadavg) is recorded
before and after every run: the figures mean little without it.

    .venv/bin/python benchmarks/bench_latency_repeat.py --runs 4 --under-training > runs/latency.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cli_args import count

# The eight architectures: (name, width, per-stage spsa, channel attention).
ARCHS: list[tuple[str, float, bool, str]] = [
    ("w0.25 plain", 0.25, False, "none"),
    ("w0.25 spsa", 0.25, True, "none"),
    ("w0.25 se", 0.25, False, "se"),
    ("w0.25 cbam", 0.25, False, "cbam"),
    ("w0.5 plain", 0.5, False, "none"),
    ("w0.5 eca", 0.5, False, "eca"),
    ("w0.5 spsa+se", 0.5, True, "se"),
    ("w0.5 spsa+cbam", 0.5, True, "cbam"),
]
# The first protocol's config, with the LatencyConfig defaults it had (threads: torch's default).
BEFORE = {"protocol": "simple", "warmup": 5, "repeats": 30, "min_time_s": 0.0, "threads": None}
PROTOCOLS = ("before", "after", "after_together")


def _specs() -> dict[str, Any]:
    from spsa_nas.spec import ArchSpec, StageSpec

    return {name: ArchSpec.uniform("resnet18", StageSpec(spsa=spsa, channel_attn=attn), width=width,
                                   stem="cifar", input_size=16, num_classes=10, in_channels=1)
            for name, width, spsa, attn in ARCHS}


def child(protocol: str, lock_dir: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """One fresh process: measure the eight architectures (under the gate when `lock_dir`)."""
    import contextlib

    import torch

    from spsa_nas import build_model
    from spsa_nas.config import LatencyConfig
    from spsa_nas.latency import measure_group, measure_latency, reference_model

    load_before = os.getloadavg()
    start = time.perf_counter()
    specs = _specs()
    torch.manual_seed(0)
    models = {name: build_model(spec) for name, spec in specs.items()}
    cfg = LatencyConfig(**BEFORE) if protocol == "before" else LatencyConfig(**overrides)  # type: ignore[arg-type]
    reference = reference_model(next(iter(specs.values())), cfg)
    gate: Any = None
    if lock_dir is not None:
        from workers.latency_gate import NodeGate

        gate = NodeGate(lock_dir, pause_training=True)
    hold = gate.latency_lock if gate is not None else contextlib.nullcontext
    shape = (1, 16, 16)
    out: dict[str, Any] = {}
    if protocol == "after_together":
        with hold():
            results = measure_group(models, shape, cfg, "cpu", reference=reference[0] if reference else None,
                                    reference_name=reference[1] if reference else None)
        out = {name: results[name].to_dict() for name in models}
    else:
        for name, model in models.items():
            with hold():
                result = measure_latency(model, shape, cfg, "cpu",
                                         reference=reference[0] if reference else None,
                                         reference_name=reference[1] if reference else None)
            out[name] = result.to_dict()
    return {"results": out, "seconds": time.perf_counter() - start, "load_before": load_before,
            "load_after": os.getloadavg(), "threads": torch.get_num_threads()}


TRAINER = """
import sys, torch
from workers.latency_gate import NodeGate
from spsa_nas import build_model
from spsa_nas.spec import ArchSpec, StageSpec
gate = NodeGate(sys.argv[1], pause_training=True)
torch.set_num_threads(1)  # one trial: Ray gives it num_cpus=1
model = build_model(ArchSpec.uniform("resnet18", StageSpec(channel_attn="se"), width=0.5, stem="cifar",
                                     input_size=16, num_classes=10, in_channels=1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
print("training", flush=True)
while True:
    gate.checkpoint()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
"""


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a of two equally long lists (no ties expected among latencies)."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    score = sum((1 if (a[i] - a[j]) * (b[i] - b[j]) > 0 else -1) for i, j in pairs if a[i] != a[j])
    return score / len(pairs)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """CV per architecture (time, ratio), tau between runs, share of re-measurements within 5 %."""
    names = [name for name, *_ in ARCHS]
    per_arch: dict[str, Any] = {}
    within: dict[str, list[bool]] = {"time": [], "ratio": []}
    for name in names:
        times = [r["results"][name]["median_ms"] for r in runs]
        ratios = [r["results"][name].get("ratio") for r in runs]
        row: dict[str, Any] = {"median_ms": times,
                               "cv_time": statistics.stdev(times) / statistics.mean(times)}
        within["time"] += [abs(t - times[0]) <= 0.05 * times[0] for t in times[1:]]
        if all(v is not None for v in ratios):
            row["ratio"] = ratios
            row["cv_ratio"] = statistics.stdev(ratios) / statistics.mean(ratios)
            within["ratio"] += [abs(v - ratios[0]) <= 0.05 * ratios[0] for v in ratios[1:]]
        first = runs[0]["results"][name]
        if first.get("ci_low_ms") is not None:
            row["ci_ms_run1"] = [first["ci_low_ms"], first["ci_high_ms"]]
            row["blocks"] = [r["results"][name]["blocks"] for r in runs]
        per_arch[name] = row
    out: dict[str, Any] = {"architectures": per_arch}
    for kind in ("time", "ratio"):
        key = "median_ms" if kind == "time" else "ratio"
        if kind == "ratio" and "ratio" not in per_arch[names[0]]:
            continue
        cvs = [per_arch[n][f"cv_{kind}"] for n in names]
        taus = [kendall_tau([per_arch[n][key][i] for n in names], [per_arch[n][key][j] for n in names])
                for i, j in itertools.combinations(range(len(runs)), 2)]
        out[kind] = {"cv_median": statistics.median(cvs), "cv_max": max(cvs),
                     "archs_cv_le_3pct": sum(cv <= 0.03 for cv in cvs), "kendall_tau_min": min(taus),
                     "kendall_tau_all": taus, "within_5pct_share": sum(within[kind]) / len(within[kind])}
    out["seconds_per_run"] = [round(r["seconds"], 1) for r in runs]
    out["load_per_run"] = [[list(r["load_before"]), list(r["load_after"])] for r in runs]
    return out


def run_protocol(protocol: str, runs: int, lock_dir: str | None, overrides: str) -> dict[str, Any]:
    results = []
    for _ in range(runs):
        cmd = [sys.executable, __file__, "--child", protocol, "--after-config", overrides]
        if lock_dir is not None:
            cmd += ["--lock-dir", lock_dir]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout))
    return summarise(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=count(2), default=4, help="fresh processes per protocol")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated subset")
    parser.add_argument("--under-training", nargs="?", const="after,after_together", default="",
                        help="also measure these protocols (default: after,after_together) while another "
                             "process trains under the latency gate")
    parser.add_argument("--after-config", default="{}",
                        help="JSON of LatencyConfig fields for the after protocols (default: the defaults)")
    parser.add_argument("--child", choices=PROTOCOLS, help=argparse.SUPPRESS)
    parser.add_argument("--lock-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.lock_dir, json.loads(args.after_config))))
        return 0
    protocols = [p for p in args.protocols.split(",") if p]
    unknown = sorted((set(protocols) | set(filter(None, args.under_training.split(",")))) - set(PROTOCOLS))
    if unknown:
        parser.error(f"--protocols: unknown {unknown}; valid {list(PROTOCOLS)}")
    from spsa_nas.config import LatencyConfig

    after = LatencyConfig(**json.loads(args.after_config)).model_dump(mode="json")  # refused here if wrong
    report: dict[str, Any] = {"runs": args.runs, "cpus": os.cpu_count(), "load_start": os.getloadavg(),
                              "architectures": [name for name, *_ in ARCHS], "before_config": BEFORE,
                              "after_config": after}
    for protocol in protocols:
        report[protocol] = run_protocol(protocol, args.runs, None, args.after_config)
    if args.under_training:
        with tempfile.TemporaryDirectory(prefix="spsa-gate-") as tmp:
            lock_dir = str(Path(tmp) / "locks")
            trainer = subprocess.Popen([sys.executable, "-c", TRAINER, lock_dir], stdout=subprocess.PIPE,
                                       text=True)
            try:
                assert trainer.stdout is not None
                trainer.stdout.readline()  # "training": the trainer holds the gate between steps
                for protocol in ("after", "after_together"):
                    if protocol in args.under_training.split(","):
                        report[f"{protocol}_under_training"] = run_protocol(protocol, args.runs, lock_dir,
                                                                            args.after_config)
            finally:
                trainer.kill()
                trainer.wait()
    report["load_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
