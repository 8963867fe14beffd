"""Latency of a model on a device (eval + inference mode, warm-up, synchronised repeats) and its cache key."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spsa_nas.config import LatencyConfig
from spsa_nas.spec import ArchSpec

MAX_SAMPLES = 1_000_000  # bound on timed calls when `min_time_s` asks for more than `repeats`
KEY_VERSION = 1  # bump when the protocol changes, so that cached figures are not reused


@dataclass(frozen=True)
class LatencyResult:
    """Per-batch latency figures (milliseconds) and the conditions they were measured under."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    iqr_ms: float
    min_ms: float
    max_ms: float
    repeats: int  # timed calls actually made (>= the config's repeats)
    warmup: int
    batch_size: int
    input_shape: tuple[int, ...]  # the full timed input, (batch, C, H, W)
    device: str  # "cpu", "cuda:0", ...
    device_name: str  # CPU model or GPU name
    threads: int  # torch intra-op threads during the measurement
    torch_version: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (the `latency` trial attribute)."""
        out = dataclasses.asdict(self)
        out["input_shape"] = list(self.input_shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyResult:
        """Inverse of `to_dict`; ValueError when a field is missing or unknown."""
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise ValueError(f"latency record has fields {sorted(data)}, expected {sorted(names)}")
        return cls(**{**data, "input_shape": tuple(int(v) for v in data["input_shape"])})


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' → cuda when available, else cpu; a CUDA/MPS device that is absent is a ValueError."""
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device {device!r} is not a torch device; use auto, cpu, cuda, "
                             "cuda:N or mps") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        index = resolved.index if resolved.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: unsupported type; use auto, cpu, cuda, cuda:N or mps")
    return resolved


@cache
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device) -> str:
    """A human-readable name of the hardware behind `device`."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return _cpu_name()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def full_input_shape(input_shape: Sequence[int], cfg: LatencyConfig) -> tuple[int, ...]:
    """(batch, C, H, W) from a per-sample (C, H, W), or a 4-D shape whose batch is cfg.batch_size."""
    shape = tuple(int(v) for v in input_shape)
    if len(shape) == 3:
        return (cfg.batch_size, *shape)
    if len(shape) == 4 and shape[0] == cfg.batch_size:
        return shape
    raise ValueError(f"input_shape {list(shape)}: give (C, H, W), or (N, C, H, W) with N equal to "
                     f"latency.batch_size ({cfg.batch_size})")


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def measure_latency(model: nn.Module, input_shape: Sequence[int], cfg: LatencyConfig,
                    device: str | torch.device) -> LatencyResult:
    """Median (and spread) of the wall time of one forward pass of a fixed batch on `device`.

    Protocol: the model in eval mode under `torch.inference_mode`; a fixed random input of
    `cfg.batch_size` × `input_shape`; `cfg.warmup` untimed calls; then each timed call is
    bracketed by device synchronisation and `time.perf_counter_ns`, at least `cfg.repeats` times and
    until `cfg.min_time_s` of timed calls have accumulated; `cfg.threads` torch threads for the
    duration. Afterwards the model's training flags, device and memory format are restored and the
    thread count is set back.
    """
    dev = resolve_device(device)
    shape = full_input_shape(input_shape, cfg)
    modes = {module: module.training for module in model.modules()}
    home = _model_device(model)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(dev).contiguous(memory_format=memory_format)
    samples: list[int] = []
    try:
        model.to(dev)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        model.eval()
        with _threads(cfg.threads) as threads, torch.inference_mode():
            for _ in range(cfg.warmup):
                model(x)
            _synchronize(dev)
            budget_ns = cfg.min_time_s * 1e9
            spent = 0
            while len(samples) < cfg.repeats or (spent < budget_ns and len(samples) < MAX_SAMPLES):
                _synchronize(dev)
                start = time.perf_counter_ns()
                model(x)
                _synchronize(dev)
                samples.append(time.perf_counter_ns() - start)
                spent += samples[-1]
    finally:
        if cfg.channels_last:
            model.to(memory_format=torch.contiguous_format)
        model.to(home)
        for module, training in modes.items():
            module.training = training
    ms = np.asarray(samples, dtype=np.float64) / 1e6
    q25, q50, q75, q90 = np.percentile(ms, [25, 50, 75, 90])
    return LatencyResult(
        median_ms=float(q50),
        p90_ms=float(q90),
        mean_ms=float(ms.mean()),
        std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        iqr_ms=float(q75 - q25),
        min_ms=float(ms.min()),
        max_ms=float(ms.max()),
        repeats=len(samples),
        warmup=cfg.warmup,
        batch_size=cfg.batch_size,
        input_shape=shape,
        device=str(dev),
        device_name=device_name(dev),
        threads=threads,
        torch_version=torch.__version__,
    )


def latency_key(spec: ArchSpec, input_shape: Sequence[int], cfg: LatencyConfig,
                device: str | torch.device) -> str:
    """A stable hash of everything a latency figure depends on: the architecture (spec JSON), the
    timed input shape, the protocol (config), the hardware (device type and name), the thread count
    and the torch version. Weights are not part of it: they do not change latency."""
    dev = resolve_device(device)
    threads = cfg.threads if cfg.threads is not None else torch.get_num_threads()
    record = {
        "version": KEY_VERSION,
        "spec": spec.model_dump(mode="json"),
        "input_shape": list(full_input_shape(input_shape, cfg)),
        "latency": cfg.model_dump(mode="json"),
        "device_type": dev.type,
        "device_name": device_name(dev),
        "threads": threads,
        "torch": torch.__version__,
    }
    blob = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
