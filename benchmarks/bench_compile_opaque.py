"""Compiled ResNet-50: plain vs SPSA as its decomposition vs SPSA as the opaque custom op (JSON).

What the compiled SPSA model costs and whether the decomposition (what torch.compile gets, see
docs/attention.md) or the custom op with the fused C++ kernel is faster under inductor: the three
models compiled in one process, then `--rounds` interleaved forward passes at batch `--batch`,
224x224, no grad; median ms (first round dropped) and each SPSA variant's throughput ratio to plain.

    .venv/bin/python benchmarks/bench_compile_opaque.py --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from cli_args import count

import spsa_nas.attention.spsa as spsa_module
from spsa_nas import build_model
from spsa_nas.spec import ArchSpec, StageSpec


def _model(spsa: bool) -> torch.nn.Module:
    return build_model(ArchSpec.uniform("resnet50", StageSpec(spsa=spsa), width=1.0, stem="imagenet",
                                        input_size=224, num_classes=1000, in_channels=3)).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=count(), default=8)
    parser.add_argument("--rounds", type=count(), default=6)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 2:
        parser.error("--batch must be >= 1 and --rounds >= 2")
    x = torch.randn(args.batch, 3, 224, 224)
    load_before = os.getloadavg()
    models: dict[str, torch.nn.Module] = {}
    with torch.no_grad():
        torch.manual_seed(0)
        models["plain"] = torch.compile(_model(False))
        models["plain"](x)
        models["decomposition"] = torch.compile(_model(True))  # what torch.compile gets
        models["decomposition"](x)
        original = spsa_module._compiling_not_exporting
        spsa_module._compiling_not_exporting = lambda: False  # compile keeps the custom op
        try:
            models["opaque_op"] = torch.compile(_model(True))
            models["opaque_op"](x)  # compiled here, while the switch holds
        finally:
            spsa_module._compiling_not_exporting = original
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t[1:]) * 1000 for name, t in times.items()}
    print(json.dumps({"batch": args.batch, "rounds": args.rounds, "median_ms": median,
                      "throughput_ratio_to_plain": {n: median["plain"] / m for n, m in median.items()},
                      "loadavg_before": load_before, "loadavg_after": os.getloadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
