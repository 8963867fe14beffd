"""What the SPSA op costs against a plain copy of the same tensor, per shape and layout, as JSON.

For each shape (default: the issue's 8x256x56², 8x512x28², 8x1024x14², 64x256x8²) and layout
(NCHW, channels_last), in inference (no grad), times in one interleaved loop (order rotated
every round, so that the machine's drift hits every variant alike):

- `copy`: `x.clone()` (read x, allocate and write a new tensor: the floor any out-of-place op has);
- `copy_into`: `out.copy_(x)` into a preallocated tensor (no allocation);
- `fused`: `SPSA(c)(x)` with the default implementation (the custom op; its fused kernel);
- `fused_inplace`: the same with `inplace=True` (what the models use in eval; no allocation),
  on a fresh copy of x each time, compared with `copy_into`;
- `decomposed` and `reference`: the plain-torch implementations;
- with `--switches`: `fused_norev` (reverse=False), `fused_cosine` (similarity="cosine") and
  `fused_norev_cosine`, the ablation switches' variants of the fused op.

Each variant's median and minimum time and their ratios to `copy` (`fused_inplace`: to
`copy_into`) are reported (the minimum is the run least disturbed by other processes),
with the target (fused <= 2.5 x copy on the CPU, <= 1.9 x on CUDA) and the machine's load average
(os.getloadavg) before and after: the machine may be shared, and a load above the number of cores
makes every figure slower and noisier.

`--warm-heap` (CPU, glibc): every allocation of up to 32 MiB comes from the heap and freed memory is
kept (mallopt M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB), as in a long-running process whose
allocator reuses its memory. Without it glibc serves a large tensor by mmap, freshly, or from
the heap, depending on its history, and an allocating call pays a page fault per 4 KiB page
or none: at these sizes that decides the allocating ratios (`copy` itself moved 10x between
runs, 0.13 against 1.29 ms at 64x256x8²); the in-place pair (`fused_inplace` against
`copy_into`) allocates nothing and reads the same either way.

Usage: python benchmarks/bench_spsa_op.py [--device cpu|cuda] [--repeats 30] [--shapes 8x256x56x56,...]
[--threads N] [--quick] [--switches] [--warm-heap]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from cli_args import count

from spsa_nas.attention import SPSA
from spsa_nas.attention.kernels import cpu as cpu_kernel
from spsa_nas.attention.kernels import fused_available

SHAPES = ["8x256x56x56", "8x512x28x28", "8x1024x14x14", "64x256x8x8"]
TARGET = {"cpu": 2.5, "cuda": 1.9}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HEAP_MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)


def warm_heap() -> str:
    """Make glibc serve allocations of up to 32 MiB from the heap and keep freed memory (no page
    faults once warm); what was set, or raise OSError where there is no glibc mallopt."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        raise OSError("--warm-heap needs glibc's mallopt (Linux); this C library has none")
    if not (libc.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)):
        raise OSError("--warm-heap: mallopt refused M_MMAP_THRESHOLD 32 MiB / M_TRIM_THRESHOLD 1 GiB")
    return "glibc heap: mmap threshold 32 MiB, trim threshold 1 GiB (--warm-heap)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured round-robin with a rotated order."""
    names = list(fns)
    for name in names:  # warm-up (and the kernel's first-use build)
        fns[name]()
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _ratios(seconds: dict[str, float]) -> dict[str, float]:
    ratios = {k: round(v / seconds["copy"], 3) for k, v in seconds.items()
              if k not in ("copy", "fused_inplace")}
    ratios["fused_inplace_vs_copy_into"] = round(seconds["fused_inplace"] / seconds["copy_into"], 3)
    return ratios


def measure(shape: tuple[int, ...], channels_last: bool, args: argparse.Namespace,
            device: torch.device) -> dict[str, Any]:
    x = torch.randn(shape, device=device) + torch.randn(1, shape[1], 1, 1, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x)
    scratch = torch.empty_like(x)
    fused = SPSA(shape[1]).eval()
    fused_inplace = SPSA(shape[1], inplace=True).eval()
    decomposed = SPSA(shape[1], impl="decomposed").eval()
    reference = SPSA(shape[1], impl="reference").eval()

    def inplace() -> None:
        scratch.copy_(x)
        fused_inplace(scratch)

    fns: dict[str, Callable[[], Any]] = {
        "copy": lambda: x.clone(),
        "copy_into": lambda: out.copy_(x),
        "fused": lambda: fused(x),
        "copy_then_fused_inplace": inplace,
    }
    if not args.quick:
        fns["decomposed"] = lambda: decomposed(x)
        fns["reference"] = lambda: reference(x)
    if args.switches:
        variants = (("fused_norev", False, "correlation"), ("fused_cosine", True, "cosine"),
                    ("fused_norev_cosine", False, "cosine"))
        for name, reverse, similarity in variants:
            module = SPSA(shape[1], reverse=reverse, similarity=similarity).eval()  # type: ignore[arg-type]
            fns[name] = lambda module=module: module(x)
    with torch.no_grad():
        times = interleaved(fns, args.repeats, device)
    result: dict[str, Any] = {}
    for stat, pick in (("median", statistics.median), ("min", min)):
        seconds = {k: pick(v) for k, v in times.items()}
        # in place: the copy that restores x first is timed with it; take the copy's time off
        seconds["fused_inplace"] = max(seconds.pop("copy_then_fused_inplace") - seconds["copy_into"], 0.0)
        result[f"{stat}_ms"] = {k: round(v * 1e3, 4) for k, v in seconds.items()}
        result[f"ratio_to_copy_{stat}"] = _ratios(seconds)
    bound = TARGET.get(device.type, 2.5)
    result["target"] = {"fused_vs_copy": f"<= {bound} (median)",
                        "met": result["ratio_to_copy_median"]["fused"] <= bound}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=count(), default=30)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated NxCxHxW")
    parser.add_argument("--threads", type=count(), default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: one small shape, 3 repeats")
    parser.add_argument("--switches", action="store_true",
                        help="also time the fused op with reverse=False and/or similarity='cosine'")
    parser.add_argument("--warm-heap", action="store_true",
                        help="CPU: allocations up to 32 MiB from glibc's heap, freed memory kept (no "
                             "page faults once warm: readable allocating ratios)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"device {args.device!r}: CUDA is not available here", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes: expected NxCxHxW,..., got {args.shapes!r}")
    if any(len(s) != 4 or min(s) < 1 for s in shapes):
        parser.error(f"--shapes: each shape needs 4 positive sizes, got {args.shapes!r}")
    if args.quick:
        shapes, args.repeats = [(2, 32, 8, 8)], 3
    allocator = "default"
    if args.warm_heap:
        if device.type != "cpu":
            parser.error("--warm-heap: applies to the CPU's allocator (glibc), not to CUDA")
        try:
            allocator = warm_heap()
        except OSError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    probe = torch.empty(1, 2, 1, 1, device=device)
    report: dict[str, Any] = {
        "benchmark": "spsa_op",
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "fused_kernel": fused_available(probe),
        "cpu_kernel_status": cpu_kernel.status() if device.type == "cpu" else None,
        "repeats": args.repeats,
        "allocator": allocator,
        "loadavg_before": os.getloadavg(),
        "shapes": {},
    }
    started = time.perf_counter()
    for shape in shapes:
        name = "x".join(map(str, shape))
        report["shapes"][name] = {layout: measure(shape, layout == "channels_last", args, device)
                                  for layout in ("nchw", "channels_last")}
        print(f"[{time.strftime('%H:%M:%S')}] {name} done", file=sys.stderr, flush=True)
    report["loadavg_after"] = os.getloadavg()
    report["all_targets_met"] = all(v["target"]["met"] for s in report["shapes"].values() for v in s.values())
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
