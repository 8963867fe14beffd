"""What SPSA costs against the least any spatial gate at its place costs, per runtime, as JSON.

ResNet-50 (224², ImageNet stem), one thread, rounds interleaved, in each runtime of --runtimes:
`onnxruntime` (the search's latency setting, batch 1: exported with `spsa_nas.export.export_onnx`,
onnxruntime's CPU provider with all graph optimisations) and `compiled` (torch.compile, default
mode, at --compiled-batch, default 8: issue 11's throughput setting). Four models: the plain
backbone; SPSA in every block; and the same model with every SPSA replaced by a *minimal gate*,
x · sigmoid(Σ_c x_c) — one channel sum (a one-row MatMul), a sigmoid and a multiply: the least a
data-dependent spatial gate after the last BN of a block can be; and the same gate written as
onnxruntime's NCHWc layout optimiser can keep it (`conv_gate`: the channel sum a 1x1 Conv C->1, the
sigmoid, a 1x1 Conv 1->C of ones that broadcasts it, and a multiply of two same-shape tensors). The
lower of the two gates' ratios to plain is the floor for SPSA in that runtime on this CPU. In
onnxruntime the minimal gate stops the NCHWc optimiser from fusing the block's last Conv (+BN) with
the residual Add and ReLU and puts a ReorderOutput/ReorderInput pair (NCHWc <-> NCHW) around it;
the conv gate avoids the reorders but still splits that fusion and writes its broadcast out in
full; under inductor either gate splits the block's epilogue fusion. With `--profile`,
onnxruntime's profiler gives the time per operator type of one run of each model (where the SPSA
model's extra time goes).

    .venv/bin/python benchmarks/bench_gate_floor.py --rounds 40 --profile --out runs/gate_floor.json
    .venv/bin/python benchmarks/bench_gate_floor.py --runtimes compiled --rounds 5 \\
        --out runs/gate_floor_compiled.json

`--save-onnx DIR` keeps the exported graphs; `--also NAME=FILE` times another graph in the same
rounds, e.g. SPSA's graph exported by an earlier version of the code (run this script with that
version on PYTHONPATH and --save-onnx, then again with `--also old=DIR/spsa.onnx`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_spsa_resnet50 import interleaved, make_model  # the same directory (sys.path[0])
from cli_args import count
from torch import nn

from spsa_nas.attention.spsa import SPSA
from spsa_nas.export import export_onnx


class ConvGate(nn.Module):
    """x · sigmoid(Σ_c x_c) as 1x1 convolutions with constant weights (ones): Conv C->1, Sigmoid,
    Conv 1->C, Mul of equal shapes - the operators onnxruntime's NCHWc optimiser keeps in its
    blocked layout, so no reorder is needed around the gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.total = nn.Conv2d(channels, 1, 1, bias=False)
        self.spread = nn.Conv2d(1, channels, 1, bias=False)
        for conv in (self.total, self.spread):
            nn.init.ones_(conv.weight)
            conv.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.spread(torch.sigmoid(self.total(x)))


class MinimalGate(nn.Module):
    """x · sigmoid(Σ_c x_c): a spatial gate with one channel sum (a one-row MatMul in ONNX)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("ones", torch.ones(1, channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        sums = torch.matmul(self.ones, x.flatten(2))  # (N, 1, P)
        return x * torch.sigmoid(sums).reshape(n, 1, h, w)


B1X224 = {"batch": 1, "size": 224, "stem": "imagenet", "width": 1.0}


def models() -> dict[str, nn.Module]:
    """ResNet-50 (bench_spsa_resnet50's models): plain, SPSA in every block, and each of the two
    gates in SPSA's place."""
    cpu = torch.device("cpu")
    return {"plain": make_model("plain", B1X224, cpu).eval(),
            "spsa": make_model("spsa_fast", B1X224, cpu).eval(),
            "minimal_gate": with_gates(make_model("spsa_fast", B1X224, cpu).eval(), MinimalGate),
            "conv_gate": with_gates(make_model("spsa_fast", B1X224, cpu).eval(), ConvGate)}


def summarise(fns: dict[str, Any], rounds: int, warmup: int) -> dict[str, Any]:
    """Median ms per model over `rounds` rotated rounds (bench_spsa_resnet50.interleaved); ratios to
    plain and per-round quartiles (of every model but plain: spsa, the gates and any --also); SPSA
    above the floor (the faster gate), as a share of plain."""
    seconds = interleaved(fns, rounds, warmup, torch.device("cpu"))
    times = {name: [t * 1e3 for t in ts] for name, ts in seconds.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    others = [name for name in fns if name != "plain"]
    ratios = {name: [t / p for t, p in zip(times[name], times["plain"], strict=True)] for name in others}
    return {
        "median_ms": {k: round(v, 2) for k, v in median.items()},
        "ratio_to_plain": {k: round(median[k] / median["plain"], 3) for k in others},
        "per_round_ratio_quartiles": {
            k: [round(float(np.percentile(v, q)), 3) for q in (25, 50, 75)] for k, v in ratios.items()},
        "floor": min(("minimal_gate", "conv_gate"), key=median.__getitem__),
        "spsa_above_floor": round((median["spsa"] - min(median["minimal_gate"], median["conv_gate"]))
                                  / median["plain"], 3),
        "rounds": rounds,
    }


def with_gates(model: nn.Module, gate: type[nn.Module]) -> nn.Module:
    """`model` with each SPSA module replaced by a `gate` of its width (RuntimeError: none)."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SPSA):
                setattr(parent, name, gate(child.channels))
                replaced += 1
    if replaced == 0:
        raise RuntimeError("bench_onnx_floor: the SPSA model holds no SPSA module to replace")
    return model


def session(path: Path, profile_prefix: str | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def profile(path: Path, x: np.ndarray, runs: int, tmp: Path) -> dict[str, Any]:
    """Per operator type: ms per run and node count, from onnxruntime's profiler."""
    sess = session(path, str(tmp / f"prof_{path.stem}"))
    for _ in range(runs):
        sess.run(None, {"input": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    total: dict[str, float] = collections.defaultdict(float)
    nodes: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            total[op] += event["dur"]
            nodes[op] += 1
    return {op: {"ms_per_run": round(total[op] / runs / 1e3, 3), "nodes": nodes[op] // runs}
            for op in sorted(total, key=total.__getitem__, reverse=True)}


def run_onnxruntime(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        saved = args.save_onnx or tmp
        saved.mkdir(parents=True, exist_ok=True)
        paths = {name: export_onnx(model, saved / f"{name}.onnx", (1, 3, 224, 224))
                 for name, model in models().items()}
        paths.update(args.also)
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        sessions = {name: session(path, None) for name, path in paths.items()}
        result = {"batch": 1, "loadavg_before": list(os.getloadavg())}
        result.update(summarise({name: (lambda s=sess: s.run(None, {"input": x}))
                                   for name, sess in sessions.items()}, args.rounds, args.warmup))
        if args.profile:
            result["profile"] = {name: profile(path, x, 20, tmp) for name, path in paths.items()}
    result["loadavg_after"] = list(os.getloadavg())
    return result


def run_compiled(args: argparse.Namespace) -> dict[str, Any]:
    x = torch.randn(args.compiled_batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    compiled = {name: torch.compile(model) for name, model in models().items()}
    result: dict[str, Any] = {"batch": args.compiled_batch, "loadavg_before": list(os.getloadavg())}
    start = time.perf_counter()
    with torch.no_grad():
        for fn in compiled.values():
            fn(x)  # compile
        result["compile_s"] = round(time.perf_counter() - start, 1)
        result.update(summarise({name: (lambda f=fn: f(x)) for name, fn in compiled.items()},
                                  args.rounds, args.warmup))
    result["loadavg_after"] = list(os.getloadavg())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtimes", default="onnxruntime",
                        help="comma-separated: onnxruntime, compiled (default onnxruntime)")
    parser.add_argument("--rounds", type=count(3), default=40, help="timed interleaved rounds (default 40)")
    parser.add_argument("--warmup", type=count(0), default=3)
    parser.add_argument("--compiled-batch", type=count(), default=8)
    parser.add_argument("--profile", action="store_true",
                        help="also profile each onnxruntime model per operator type")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--save-onnx", type=Path, metavar="DIR",
                        help="keep the exported graphs (plain.onnx, spsa.onnx, minimal_gate.onnx, "
                             "conv_gate.onnx) in DIR")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=FILE",
                        help="onnxruntime: time this ONNX graph too, in the same rounds (e.g. spsa.onnx "
                             "saved by --save-onnx from another version of the code); repeatable")
    args = parser.parse_args(argv)
    also: dict[str, Path] = {}
    for item in args.also:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            parser.error(f"--also {item!r}: expected NAME=FILE")
        if name in also or name in ("plain", "spsa", "minimal_gate", "conv_gate"):
            parser.error(f"--also {item!r}: the name {name!r} is taken")
        if not Path(file).is_file():
            parser.error(f"--also {item!r}: no such file {file!r}")
        also[name] = Path(file)
    args.also = also
    runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = sorted(set(runtimes) - {"onnxruntime", "compiled"})
    if unknown or not runtimes:
        parser.error(f"--runtimes: unknown {unknown or 'empty'}; choose from onnxruntime, compiled")
    torch.set_num_threads(1)
    result: dict[str, Any] = {"benchmark": "gate_floor", "threads": 1, "torch": torch.__version__}
    for runtime in runtimes:
        result[runtime] = run_onnxruntime(args) if runtime == "onnxruntime" else run_compiled(args)
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
