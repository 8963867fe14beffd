"""What SPSA costs on ResNet-50 here: inference throughput, training step time and peak memory, as JSON.

Measured on the machine it runs on, for ResNet-50 at batch 1 x 224² (latency: what the search
measures; inference only), batch 8 x 224² (ImageNet stem) and batch 64 x 32² (CIFAR stem: at 32²
the ImageNet stem would leave layer4 at 1x1, where SPSA's gate is a constant). Variants: the
plain backbone; SPSA in every block, the default implementation (`spsa_fast`: the fused op) and
the reference path; SE in every block; ECA in every block.

- Inference: eval mode, no grad; every round times one forward of each variant in a rotated
  order (interleaved, so that drifts of the machine hit all variants alike); throughput =
  batch / median time; each variant's ratio to the plain backbone. Eager, and `torch.compile`d
  (default mode) for the variants in --compile-variants (compile time reported).
- onnxruntime: plain and default SPSA exported with `spsa_nas.export.export_onnx` (SPSA as its
  decomposition), run by onnxruntime's CPU provider with as many intra-op threads as torch has,
  interleaved the same way (export time reported).
- Training: plain, fast and reference SPSA (both recompute the last BN + SPSA in the backward,
  `build_model(memory_efficient=True)`, the default), and fast SPSA without the recomputation;
  one SGD step (no momentum, so no optimizer state) on random labels, interleaved
  the same way, median step time. Peak memory: on CUDA `torch.cuda.max_memory_allocated` over
  one step (after a warm-up step); on the CPU there is no allocator statistic, so each variant
  runs in a fresh subprocess and the peak is the growth of the process's resident set (its
  high-water mark VmHWM minus VmRSS before the step: activations, gradients and
  workspace, the same allocator for all variants). Also reported: the bytes autograd saves for
  the backward pass (saved_tensors_hooks, unique storages), exact and device-independent.

Targets (from the issue), reported with `met` flags: at batch 1, SPSA's latency <= 1.10 x plain
in eager, compiled and onnxruntime; at larger batches compiled SPSA >= 0.97 of the plain
backbone's inference throughput, eager fast SPSA >= 0.90, training peak memory <= 1.05 x plain.
The machine's load average (os.getloadavg) is recorded before and after each measurement: other
processes on a shared machine slow every variant, and interleaving makes that drift cancel out
of the ratios, not out of the absolute figures.

- Trial latency (batch-1 configs, and --quick's): SPSA / plain as a search measures it, through
  `spsa_nas.latency.measure_latency` (the trial's protocol, the plain model as its interleaved
  reference) in each runtime of --trial-runtimes (LatencyConfig.runtime: eager, compiled,
  onnxruntime), with the ratio's interval; --trial-latency-only skips everything else.

Usage: python benchmarks/bench_spsa_resnet50.py [--quick] [--device cpu|cuda] [--no-compile] [--no-onnx]
`--quick` is a smoke run (one tiny config at width 0.25, 3 repeats, training of plain and fast
SPSA only, no compile unless --compile): it checks that the script works, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from cli_args import count, positive
from torch import nn

from spsa_nas.counting import saved_for_backward_bytes
from spsa_nas.models import build_model
from spsa_nas.spec import ArchSpec, StageSpec

VARIANTS: dict[str, StageSpec] = {
    "plain": StageSpec(),
    "spsa_fast": StageSpec(spsa=True),
    "spsa_reference": StageSpec(spsa=True),
    "se": StageSpec(channel_attn="se"),
    "eca": StageSpec(channel_attn="eca"),
}
#: Training also measures fast SPSA with memory_efficient=False (SPSA keeps its input for the
#: backward instead of recomputing the last BN and SPSA there): the recomputation's cost.
TRAIN_VARIANTS = ("plain", "spsa_fast", "spsa_reference", "spsa_fast_no_recompute")


def make_model(variant: str, cfg: dict[str, Any], device: torch.device) -> nn.Module:
    """ResNet-50 with `variant`'s attention in every block, on `device`."""
    torch.manual_seed(0)
    recompute = variant != "spsa_fast_no_recompute"
    stage = VARIANTS["spsa_fast" if not recompute else variant]
    spec = ArchSpec.uniform("resnet50", stage, stem=cfg["stem"], input_size=cfg["size"],
                            width=cfg["width"], num_classes=1000)
    model = build_model(spec, memory_efficient=recompute)
    if variant == "spsa_reference":
        for module in model.modules():
            if type(module).__name__ == "SPSA":
                module.impl = "reference"
    return model.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured round-robin (order rotated every round)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_timed(fns[name], device))
    return times


def inference(cfg: dict[str, Any], variants: list[str], compiled: bool, args: argparse.Namespace,
              device: torch.device) -> dict[str, Any]:
    """Throughput of each variant and its ratio to plain, eager or compiled."""
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device)
    fns: dict[str, Callable[[], Any]] = {}
    compile_s: dict[str, float] = {}
    for name in variants:
        model = make_model(name, cfg, device).eval()
        if compiled:
            model = torch.compile(model)
            start = time.perf_counter()
            with torch.no_grad():
                model(x)  # compiles
            compile_s[name] = round(time.perf_counter() - start, 1)

        def forward(model: nn.Module = model) -> None:
            with torch.no_grad():
                model(x)

        fns[name] = forward
    progress(f"inference {cfg} {'compiled' if compiled else 'eager'}: timing {', '.join(variants)}")
    times = interleaved(fns, args.repeats, args.warmup, device)
    out: dict[str, Any] = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        out[name] = {"median_ms": round(median * 1e3, 2), "img_per_s": round(cfg["batch"] / median, 2)}
    plain = out["plain"]["img_per_s"]
    result: dict[str, Any] = {"variants": out,
                              "ratio_to_plain": {n: round(v["img_per_s"] / plain, 4) for n, v in out.items()}}
    if compiled:
        result["compile_s"] = compile_s
    return result


def onnxruntime_inference(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Latency/throughput of plain and default SPSA exported to ONNX, run by onnxruntime (CPU)."""
    import onnxruntime as ort

    from spsa_nas.export import export_onnx

    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"]).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    fns: dict[str, Callable[[], Any]] = {}
    export_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("plain", "spsa_fast"):
            model = make_model(name, cfg, torch.device("cpu")).eval()
            start = time.perf_counter()
            path = export_onnx(model, os.path.join(tmp, f"{name}.onnx"), tuple(x.shape))
            export_s[name] = round(time.perf_counter() - start, 1)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            fns[name] = lambda session=session: session.run(None, {"input": x})
    progress(f"inference {cfg} onnxruntime: timing {', '.join(fns)}")
    times = interleaved(fns, args.repeats, args.warmup, torch.device("cpu"))
    out = {name: {"median_ms": round(statistics.median(ts) * 1e3, 2),
                  "img_per_s": round(cfg["batch"] / statistics.median(ts), 2)} for name, ts in times.items()}
    plain = out["plain"]["img_per_s"]
    return {"variants": out, "onnxruntime": ort.__version__, "export_s": export_s,
            "ratio_to_plain": {n: round(v["img_per_s"] / plain, 4) for n, v in out.items()}}


def trial_latency(cfg: dict[str, Any], runtime: str, args: argparse.Namespace,
                  device: torch.device) -> dict[str, Any]:
    """SPSA / plain as a search measures it: spsa_nas.latency.measure_latency, the trial's own code
    (interleaved blocks, warm-up until settled, median of block ratios with its interval), with the
    plain ResNet-50 as the reference, both in `runtime` (LatencyConfig.runtime)."""
    from spsa_nas.config import LatencyConfig
    from spsa_nas.latency import measure_latency

    latency = LatencyConfig(runtime=runtime, batch_size=cfg["batch"], threads=args.threads or 1,
                            max_time_s=args.trial_max_time_s, max_warmup_s=args.trial_max_time_s / 2)
    spsa, plain = make_model("spsa_fast", cfg, device), make_model("plain", cfg, device)
    progress(f"trial latency {cfg} {runtime}: spsa_fast against plain (spsa_nas.latency)")
    result = measure_latency(spsa, (3, cfg["size"], cfg["size"]), latency, device, reference=plain,
                             reference_name="resnet50 plain")
    return {"runtime": result.runtime, "runtime_version": result.runtime_version,
            "spsa_over_plain": result.ratio, "ratio_ci": [result.ratio_ci_low, result.ratio_ci_high],
            "spsa_ms": result.median_ms, "plain_ms": result.reference_ms, "threads": result.threads,
            "blocks": result.blocks, "converged": result.converged, "settled": result.settled,
            "prepare_s": result.prepare_s, "max_time_s": latency.max_time_s}


def _loaded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn()'s result with the load average before and after it."""
    before = os.getloadavg()
    result = fn()
    return {**result, "loadavg_before": [round(v, 2) for v in before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()]}


def progress(message: str) -> None:
    """One line on stderr, so that a long run shows where it is (stdout stays pure JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _inputs(cfg: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], generator=generator).to(device)
    y = torch.randint(0, 1000, (cfg["batch"],), generator=generator).to(device)
    return x, y


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now; VmHWM: its high-water mark)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_child(variant: str, cfg: dict[str, Any], device: torch.device) -> dict[str, int]:
    """Run in a fresh process: peak memory growth of training steps of one variant."""
    model = make_model(variant, cfg, device).train()
    x, y = _inputs(cfg, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if device.type == "cuda":
        _train_step(model, x, y, opt)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _train_step(model, x, y, opt)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        method = "cuda.max_memory_allocated"
    else:
        # VmHWM, not getrusage's ru_maxrss: the latter keeps the peak of the forked parent
        # across exec (the parent's whole RSS), which would hide any difference
        before = _status_bytes("VmRSS")
        _train_step(model, x, y, opt)
        peak = _status_bytes("VmHWM") - before
        method = "peak RSS growth (fresh process)"
    return {"peak_bytes": peak, "method": method,  # type: ignore[dict-item]
            "saved_for_backward_bytes": saved_for_backward_bytes(model, x, y)}


def training(cfg: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Step time (interleaved, in-process) and peak memory (one fresh process per variant)."""
    variants = TRAIN_VARIANTS[:2] if args.quick else TRAIN_VARIANTS
    x, y = _inputs(cfg, device)
    fns: dict[str, Callable[[], Any]] = {}
    for name in variants:
        model = make_model(name, cfg, device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        fns[name] = lambda model=model, opt=opt: _train_step(model, x, y, opt)
    progress(f"training {cfg}: timing {', '.join(variants)}")
    times = interleaved(fns, args.train_repeats, 1, device)
    del fns
    out: dict[str, Any] = {}
    for name in variants:
        progress(f"training {cfg}: peak memory of {name} in a fresh process")
        child = subprocess.run(
            [sys.executable, __file__, "--memory-child", name, "--config", json.dumps(cfg),
             "--device", str(device)],
            capture_output=True, text=True, check=False, timeout=1800,
        )
        if child.returncode != 0:
            raise RuntimeError(f"memory measurement of {name} failed:\n{child.stderr[-2000:]}")
        memory = json.loads(child.stdout.strip().splitlines()[-1])
        out[name] = {"step_ms": round(statistics.median(times[name]) * 1e3, 1), **memory}
    plain = out["plain"]
    ratios = {name: {"step_time": round(v["step_ms"] / plain["step_ms"], 4),
                     "peak_memory": round(v["peak_bytes"] / plain["peak_bytes"], 4),
                     "saved_for_backward": round(v["saved_for_backward_bytes"]
                                                 / plain["saved_for_backward_bytes"], 4)}
              for name, v in out.items()}
    return {"variants": out, "ratio_to_plain": ratios}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, no compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd runs")
    parser.add_argument("--compile", action="store_true", help="compile even with --quick")
    parser.add_argument("--compile-variants", default="plain,spsa_fast",
                        help="variants to compile (comma-separated; default plain,spsa_fast: compiling "
                             "ResNet-50 takes ~25 s per variant and shape on a CPU)")
    parser.add_argument("--repeats", type=count(), default=None, help="timed rounds (default 10, quick 3)")
    parser.add_argument("--warmup", type=count(0), default=None, help="untimed rounds (default 2, quick 1)")
    parser.add_argument("--train-repeats", type=count(), default=None,
                        help="timed training rounds (default 5)")
    parser.add_argument("--threads", type=count(), default=None, help="torch threads (default: torch's)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated subset of the configs (b1x224, b8x224, b64x32; quick: b2x32)")
    parser.add_argument("--no-train", action="store_true", help="skip the training measurements")
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime measurements")
    parser.add_argument("--trial-runtimes", default="eager,compiled,onnxruntime",
                        help="batch-1 configs: SPSA / plain also through spsa_nas.latency (the trial's "
                             "measurement) in these runtimes (comma-separated; 'none' to skip)")
    parser.add_argument("--trial-max-time-s", type=positive, default=15.0,
                        help="the trial measurement's time budget per model (LatencyConfig.max_time_s)")
    parser.add_argument("--trial-latency-only", action="store_true",
                        help="only the trial measurement (skips the benchmark's own timing and training)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.train_repeats = args.train_repeats or (2 if args.quick else 5)
    unknown = set(args.compile_variants.split(",")) - set(VARIANTS)
    if unknown or "plain" not in args.compile_variants.split(","):
        parser.error(f"--compile-variants must include plain and name only {', '.join(VARIANTS)}")
    args.trial_runtimes = [] if args.trial_runtimes == "none" else args.trial_runtimes.split(",")
    if set(args.trial_runtimes) - {"eager", "compiled", "onnxruntime"}:
        parser.error("--trial-runtimes: comma-separated eager, compiled, onnxruntime, or none")
    return args


def configs(quick: bool) -> dict[str, dict[str, Any]]:
    if quick:
        return {"b2x32": {"batch": 2, "size": 32, "stem": "cifar", "width": 0.25}}
    return {"b1x224": {"batch": 1, "size": 224, "stem": "imagenet", "width": 1.0, "train": False},
            "b8x224": {"batch": 8, "size": 224, "stem": "imagenet", "width": 1.0},
            "b64x32": {"batch": 64, "size": 32, "stem": "cifar", "width": 1.0}}


def _target(value: float | None, op: str, bound: float) -> dict[str, Any]:
    met = None if value is None else (value >= bound if op == ">=" else value <= bound)
    return {"value": value, "target": f"{op} {bound}", "met": met}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"device {args.device!r}: CUDA is not available here", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(peak_memory_child(args.memory_child, json.loads(args.config), device)))
        return 0
    do_compile = not args.no_compile and (not args.quick or args.compile)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "spsa_resnet50",
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "train_repeats": args.train_repeats,
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(v, 2) for v in os.getloadavg()],
        "configs": {},
    }
    chosen = configs(args.quick)
    if args.configs:
        wanted = args.configs.split(",")
        if set(wanted) - set(chosen):
            print(f"--configs: valid here: {', '.join(chosen)}", file=sys.stderr)
            return 2
        chosen = {name: cfg for name, cfg in chosen.items() if name in wanted}
    for name, cfg in chosen.items():
        entry: dict[str, Any] = {**cfg, "inference": {}}
        if cfg["batch"] == 1 or args.quick:
            entry["trial_latency"] = {runtime: _loaded(lambda cfg=cfg, runtime=runtime: trial_latency(
                cfg, runtime, args, device)) for runtime in args.trial_runtimes}
        if args.trial_latency_only:
            report["configs"][name] = entry
            continue
        entry["inference"]["eager"] = _loaded(lambda cfg=cfg: inference(cfg, list(VARIANTS), False, args,
                                                                         device))
        if do_compile:
            entry["inference"]["compiled"] = _loaded(lambda cfg=cfg: inference(
                cfg, args.compile_variants.split(","), True, args, device))
        else:
            entry["inference"]["compiled"] = {"skipped": "--no-compile or --quick"}
        if args.no_onnx or args.quick or device.type != "cpu":
            entry["inference"]["onnxruntime"] = {"skipped": "--no-onnx, --quick or not the CPU"}
        else:
            entry["inference"]["onnxruntime"] = _loaded(lambda cfg=cfg: onnxruntime_inference(cfg, args))
        if args.no_train or not cfg.get("train", True):
            entry["training"] = {"skipped": "--no-train or an inference-only config"}
        else:
            entry["training"] = _loaded(lambda cfg=cfg: training(cfg, args, device))
        report["configs"][name] = entry

    targets: dict[str, Any] = {}
    for name, entry in report["configs"].items():
        measured = entry.get("trial_latency", {})
        trial_targets = {f"trial_{runtime}_spsa_latency_ratio": _target(
            None if measured[runtime].get("spsa_over_plain") is None
            else round(measured[runtime]["spsa_over_plain"], 4), "<=", 1.10) for runtime in measured}
        if args.trial_latency_only:
            targets[name] = trial_targets
            continue
        if entry["batch"] == 1:  # latency: SPSA / plain in every runtime
            targets[name] = {
                f"{runtime}_spsa_latency_ratio": _target(
                    None if "ratio_to_plain" not in entry["inference"][runtime]
                    else round(1 / entry["inference"][runtime]["ratio_to_plain"]["spsa_fast"], 4), "<=", 1.10)
                for runtime in ("eager", "compiled", "onnxruntime")}
            targets[name].update(trial_targets)
            continue
        compiled = entry["inference"]["compiled"].get("ratio_to_plain", {}).get("spsa_fast")
        targets[name] = {
            "compiled_spsa_throughput_ratio": _target(compiled, ">=", 0.97),
            "eager_fast_spsa_throughput_ratio": _target(
                entry["inference"]["eager"]["ratio_to_plain"]["spsa_fast"], ">=", 0.90),
            "train_peak_memory_ratio": _target(
                entry["training"].get("ratio_to_plain", {}).get("spsa_fast", {}).get("peak_memory"),
                "<=", 1.05),
        }
    report["targets"] = targets
    report["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
