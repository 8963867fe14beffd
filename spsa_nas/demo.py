"""`python -m spsa_nas.demo`: build a hybrid SPSA-SE ResNet-50 from a spec and print what it costs."""

from __future__ import annotations

import argparse
import json
import time

import torch

from spsa_nas.config import LatencyConfig
from spsa_nas.counting import count_flops, count_params, spsa_cost
from spsa_nas.latency import measure_latency
from spsa_nas.models import build_model
from spsa_nas.spec import ArchSpec, StageSpec


def demo_spec() -> ArchSpec:
    """SPSA-SE on ResNet-50: SE in every block, SPSA with more heads and a sharper gate deeper."""
    stages = [
        StageSpec(spsa=True, spsa_heads=1, spsa_alpha=1.0, channel_attn="se"),
        StageSpec(spsa=True, spsa_heads=2, spsa_alpha=1.0, channel_attn="se"),
        StageSpec(spsa=True, spsa_heads=4, spsa_alpha=1.5, channel_attn="se"),
        StageSpec(spsa=True, spsa_heads=8, spsa_alpha=2.0, channel_attn="se",
                  attn_order="spsa_first"),
    ]
    return ArchSpec(backbone="resnet50", stages=stages, num_classes=1000, input_size=224)


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    """Print the demo spec, its parameters, MACs, SPSA's memory traffic and measured latency."""
    parser = argparse.ArgumentParser(prog="python -m spsa_nas.demo", description=__doc__)
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward passes (default 3)")
    args = parser.parse_args(argv)
    if args.repeats < 3 or args.warmup < 0:
        parser.error("--repeats must be >= 3 and --warmup >= 0")

    started = time.perf_counter()
    torch.manual_seed(0)
    spec = demo_spec()
    plain_spec = ArchSpec.plain(spec.backbone, num_classes=spec.num_classes, input_size=spec.input_size)
    model, plain = build_model(spec), build_model(plain_spec)
    shape = (1, spec.in_channels, spec.input_size, spec.input_size)

    print("spsa-nas demo: a hybrid SPSA-SE ResNet-50 built from its spec")
    print()
    print("spec (JSON):")
    print(json.dumps(spec.model_dump(mode="json"), indent=2))
    print()
    params, plain_params = count_params(model), count_params(plain)
    flops, plain_flops = count_flops(model, shape), count_flops(plain, shape)
    print(f"{'':24}{'hybrid':>16}{'plain':>16}{'delta':>16}")
    print(f"{'parameters':24}{params:>16,}{plain_params:>16,}{params - plain_params:>+16,}")
    print(f"{'MACs (G, fvcore)':24}{flops / 1e9:>16.4f}{plain_flops / 1e9:>16.4f}"
          f"{(flops - plain_flops) / 1e9:>+16.4f}")

    cost = spsa_cost(model, shape)
    print()
    print(f"SPSA's memory traffic (fp32, one {shape[0]}x{shape[1]}x{shape[2]}x{shape[3]} forward; "
          "the MAC count above hides it):")
    print(f"  {cost['modules']} SPSA modules over {cost['elements']:,} input elements "
          f"({_mib(cost['bytes_in'])})")
    print(f"  read {_mib(cost['bytes_read'])}, written {_mib(cost['bytes_written'])}: "
          f"{cost['passes']:.1f} full-tensor passes per call, {cost['ops']:.0f} aten ops per call")

    cfg = LatencyConfig(batch_size=1, warmup=args.warmup, repeats=args.repeats)
    hybrid_ms = measure_latency(model, shape, cfg, "cpu")
    plain_ms = measure_latency(plain, shape, cfg, "cpu")
    print()
    print(f"latency (CPU, batch 1 at {spec.input_size}x{spec.input_size}, {cfg.warmup} warm-up, median of "
          f"{hybrid_ms.repeats}, {hybrid_ms.threads} threads, {hybrid_ms.device_name}):")
    print(f"  hybrid {hybrid_ms.median_ms:8.1f} ms   plain {plain_ms.median_ms:8.1f} ms   "
          f"ratio {hybrid_ms.median_ms / plain_ms.median_ms:.3f}")
    print()
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
