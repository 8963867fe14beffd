"""Latency of a model on a device (eval + inference mode, warm-up, synchronised repeats) and its cache key."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
Forward = Callable[[torch.Tensor], Any]  # one timed call of a model in its runtime
KEY_VERSION = 2  # bump when the protocol changes, so that cached figures are not reused
# (2: the interleaved protocol with a reference model, intervals and re-measurement)
REFERENCE = "__reference__"  # the reference's name in a group measurement


@dataclass(frozen=True)
class LatencyResult:
    """Per-batch latency figures (milliseconds) and the conditions they were measured under.

    `median_ms` is the figure a search uses: the median of single calls (protocol "simple", and
    records written before the protocol had a name) or the median of block means ("interleaved").
    The fields after `torch_version` are None in records of the first protocol (they still load).
    """

    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    iqr_ms: float
    min_ms: float
    max_ms: float
    repeats: int  # timed calls actually made (>= the config's repeats)
    warmup: int  # untimed calls made before timing
    batch_size: int
    input_shape: tuple[int, ...]  # the full timed input, (batch, C, H, W)
    device: str  # "cpu", "cuda:0", ...
    device_name: str  # CPU model or GPU name
    threads: int  # torch intra-op threads during the measurement
    torch_version: str
    protocol: str | None = None  # "interleaved" or "simple"; None: a record of the first protocol
    ci_low_ms: float | None = None  # confidence interval of median_ms (order statistics)
    ci_high_ms: float | None = None
    ci_level: float | None = None  # its confidence (e.g. 0.95)
    blocks: int | None = None  # timed blocks (block means) behind the estimate
    block_size: int | None = None  # calls per block
    ci_extensions: int | None = None  # times blocks were added because the interval was too wide
    converged: bool | None = None  # the interval ended within LatencyConfig.max_ci_rel
    settled: bool | None = None  # the warm-up ended because timing settled (not on its budget)
    reference: str | None = None  # what the reference model is, e.g. "resnet18 w0.5 plain"
    reference_ms: float | None = None  # the reference's median of block means, same process
    ratio: float | None = None  # median over blocks of (candidate block mean / adjacent reference's)
    ratio_ci_low: float | None = None
    ratio_ci_high: float | None = None
    group_size: int | None = None  # models measured side by side (1 + reference for a trial)
    affinity: list[int] | None = None  # CPUs the measuring thread was pinned to; None: not pinned
    clocks: dict[str, Any] | None = None  # CUDA: clocks/temperature, or a note why none
    measured_at: float | None = None  # unix time at the end of the measurement
    runtime: str | None = None  # "eager", "compiled" or "onnxruntime"; None: a record from before runtimes
    runtime_version: str | None = None  # torch's version (eager, compiled) or onnxruntime's
    prepare_s: float | None = None  # compiling (compiled) or exporting + session (onnxruntime), untimed
    onnx_graph_sha256: str | None = None  # onnxruntime: the graph measured (export.onnx_graph_sha256)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (the `latency` trial attribute)."""
        out = dataclasses.asdict(self)
        out["input_shape"] = list(self.input_shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyResult:
        """Inverse of `to_dict`, also of the first protocol's records (fewer fields); ValueError
        when a field is missing or unknown."""
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        if not required <= set(data) <= names:
            raise ValueError(f"latency record has fields {sorted(data)}, expected {sorted(required)} "
                             f"and optionally {sorted(names - required)}")
        return cls(**{**data, "input_shape": tuple(int(v) for v in data["input_shape"])})

    def interval_ms(self) -> tuple[float, float] | None:
        """(low, high) of the confidence interval of median_ms; None for a record without one."""
        if self.ci_low_ms is None or self.ci_high_ms is None:
            return None
        return (self.ci_low_ms, self.ci_high_ms)


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


@contextlib.contextmanager
def _pinned(count: int, enabled: bool) -> Iterator[list[int] | None]:
    """Pin the calling thread (and the threads it starts later) to `count` of its allowed CPUs, the
    highest-numbered ones (CPU 0 takes most interrupts), for the duration. Yields the CPUs, or
    None where nothing was pinned (disabled, or the platform has no sched_setaffinity)."""
    if not enabled or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    chosen = sorted(before)[-count:]
    try:
        os.sched_setaffinity(0, chosen)
    except OSError:
        yield None
        return
    try:
        yield chosen
    finally:
        os.sched_setaffinity(0, before)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high): the median of `values` and a distribution-free confidence interval for
    it from order statistics, [x_(k), x_(n+1-k)] with the largest k whose coverage
    1 - 2 P(Binomial(n, 1/2) <= k - 1) is at least `level`. With too few values for `level`
    (n < 6 at 0.95) the interval is [min, max], whose coverage is lower."""
    x = sorted(float(v) for v in values)
    n = len(x)
    if n == 0:
        raise ValueError("median_ci needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"median_ci: level must be between 0 and 1, got {level}")
    alpha = 1.0 - level
    k, below = 1, 0.0  # below: P(B <= k - 1)
    for j in range(0, (n + 1) // 2):
        below += math.comb(n, j) / 2**n
        if 2 * below > alpha:
            break
        k = j + 1
    return float(np.median(x)), x[k - 1], x[n - k]


def _relative_width(values: Sequence[float], level: float) -> float:
    center, low, high = median_ci(values, level)
    return (high - low) / center if center > 0 else math.inf


def _time_block(model: Forward, x: torch.Tensor, calls: int, device: torch.device, *,
                events: bool = True) -> list[float]:
    """Milliseconds of each of `calls` forward passes, each started on an idle device: CUDA events
    on CUDA (read after one synchronisation at the end; `events` False for a runtime that does not
    run on torch's stream, onnxruntime, whose calls return when done), else perf_counter_ns around
    each call with device synchronisation (MPS)."""
    if device.type == "cuda" and events:
        stream = torch.cuda.current_stream(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(calls)]
        for start, end in events:
            stream.synchronize()
            start.record(stream)
            model(x)
            end.record(stream)
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    out = []
    for _ in range(calls):
        _synchronize(device)
        begin = time.perf_counter_ns()
        model(x)
        _synchronize(device)
        out.append((time.perf_counter_ns() - begin) / 1e6)
    return out


def cuda_clocks(device: torch.device) -> dict[str, Any]:
    """The GPU's current SM/memory clocks, their maxima and temperature (nvidia-smi), or a note
    saying why they could not be read."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"note": "nvidia-smi not found: clocks not recorded"}
    index = device.index if device.index is not None else torch.cuda.current_device()
    fields = ["clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "temperature.gpu",
              "power.draw", "pstate"]
    try:
        done = subprocess.run([smi, f"--id={index}", f"--query-gpu={','.join(fields)}",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True,
                              timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"note": f"nvidia-smi failed ({type(exc).__name__}): clocks not recorded"}
    values = [v.strip() for v in done.stdout.strip().splitlines()[0].split(",")] if done.stdout else []
    if len(values) != len(fields):
        return {"note": f"nvidia-smi answered {done.stdout.strip()!r}: clocks not recorded"}
    return {"source": "nvidia-smi", **dict(zip(fields, values, strict=True))}


@dataclass
class _Track:
    """One model of a group measurement and what was timed of it."""

    name: str
    model: Forward  # the model in the measurement's runtime (_in_runtime)
    calls: int = 1  # per block
    warmup: int = 0
    last_mean: float | None = None
    settled: bool = False
    block_means: list[float] = dataclasses.field(default_factory=list)
    samples: list[float] = dataclasses.field(default_factory=list)
    events: bool = True  # time with CUDA events on CUDA (False: onnxruntime)

    def run_block(self, x: torch.Tensor, device: torch.device, *, timed: bool) -> float:
        ms = _time_block(self.model, x, self.calls, device, events=self.events)
        mean = float(np.mean(ms))
        if timed:
            self.block_means.append(mean)
            self.samples += ms
        else:
            self.warmup += self.calls
        return mean


def _warm_up(tracks: list[_Track], x: torch.Tensor, cfg: LatencyConfig, device: torch.device) -> None:
    """`cfg.warmup` calls of each model, a block size per model (about `cfg.block_ms`, at least
    repeats/blocks calls), then blocks of all models in turn until each model's two last block
    means agree within `cfg.settle_rel` or the warm-up budget is spent."""
    for _ in range(cfg.warmup):
        for track in tracks:
            track.model(x)
            track.warmup += 1
    for track in tracks:
        probe = _time_block(track.model, x, 3, device, events=track.events)
        track.warmup += 3
        per_call = max(float(np.median(probe)), 1e-3)
        wanted = max(math.ceil(cfg.repeats / cfg.blocks), round(cfg.block_ms / per_call), 1)
        track.calls = int(min(10_000, wanted))
    deadline = time.perf_counter() + cfg.max_warmup_s * len(tracks)
    while not all(t.settled for t in tracks) and time.perf_counter() < deadline:
        for track in tracks:
            mean = track.run_block(x, device, timed=False)
            last = track.last_mean
            if last is not None and abs(mean - last) <= cfg.settle_rel * last:
                track.settled = True
            track.last_mean = mean


def _figure_samples(track: _Track, reference: _Track | None) -> list[float]:
    """What a model's figure is the median of: its ratios to the reference, round by round, when
    there is one (the figure a search uses), else its block means."""
    if reference is None:
        return track.block_means
    return [c / r for c, r in zip(track.block_means, reference.block_means, strict=True)]


def _time_rounds(tracks: list[_Track], x: torch.Tensor, cfg: LatencyConfig, device: torch.device,
                 reference: _Track | None) -> int:
    """Rounds of one block per model, the order rotated each round, until every model has
    `cfg.blocks` blocks, `cfg.min_time_s` of timed calls and the interval of its figure (of its
    ratio to `reference` when there is one, _figure_samples) within `cfg.max_ci_rel`,
    or until the time budget (max(max_time_s, min_time_s) per model) is spent, whichever comes
    first. Returns the rounds added for a too wide interval."""
    budget_ms = max(cfg.max_time_s, cfg.min_time_s) * 1e3 * len(tracks)
    extensions = 0
    for round_index in range(MAX_SAMPLES):
        shift = round_index % len(tracks)
        for track in tracks[shift:] + tracks[:shift]:
            track.run_block(x, device, timed=True)
        spent = sum(sum(t.samples) for t in tracks)
        if spent >= budget_ms or min(len(t.samples) for t in tracks) >= MAX_SAMPLES:
            break  # the budget bounds everything, the minimum number of blocks included
        if round_index + 1 < cfg.blocks:
            continue
        if any(sum(t.samples) < cfg.min_time_s * 1e3 for t in tracks):
            continue
        if all(_relative_width(_figure_samples(t, reference), cfg.ci_level) <= cfg.max_ci_rel
               for t in tracks if t is not reference):
            break
        extensions += 1
    return extensions


@contextlib.contextmanager
def _prepared_models(models: Sequence[nn.Module], cfg: LatencyConfig, device: torch.device) -> Iterator[None]:
    """Every model in eval mode on `device` (channels_last if asked); afterwards each one's training
    flags, device and memory format as they were."""
    saved = [({m: m.training for m in model.modules()}, _model_device(model)) for model in models]
    try:
        for model in models:
            model.to(device)
            if cfg.channels_last:
                model.to(memory_format=torch.channels_last)
            model.eval()
        yield
    finally:
        for model, (modes, home) in zip(models, saved, strict=True):
            if cfg.channels_last:
                model.to(memory_format=torch.contiguous_format)
            model.to(home)
            for module, training in modes.items():
                module.training = training


def _input(shape: tuple[int, ...], cfg: LatencyConfig, device: torch.device) -> torch.Tensor:
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator).to(device).contiguous(memory_format=memory_format)


def _spread(samples: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(samples, dtype=np.float64)
    q25, q50, q75, q90 = np.percentile(ms, [25, 50, 75, 90])
    return {"median_ms": float(q50), "p90_ms": float(q90), "mean_ms": float(ms.mean()),
            "std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0, "iqr_ms": float(q75 - q25),
            "min_ms": float(ms.min()), "max_ms": float(ms.max())}


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeError("latency.runtime 'onnxruntime': the onnxruntime package is not installed "
                           "(pip install onnxruntime; onnxruntime-gpu for CUDA)") from exc
    return onnxruntime


def runtime_version(runtime: str) -> str:
    """The version of what runs `runtime`'s forward passes: torch's (eager, compiled) or
    onnxruntime's."""
    if runtime == "onnxruntime":
        return str(_onnxruntime().__version__)
    return torch.__version__


@dataclass
class _Prepared:
    """A model ready to be timed in a runtime: its forward, what preparing it took, and for
    onnxruntime the hash of the graph measured."""

    forward: Forward
    prepare_s: float = 0.0
    graph_sha256: str | None = None


@dataclass
class _PreparedReference:
    """A reference model prepared once in this process: the compiled module (compiled) or the
    InferenceSession (onnxruntime), what preparing it took, and the graph's hash (onnxruntime)."""

    runnable: Any
    prepare_s: float
    graph_sha256: str | None = None


class ReferenceCache:
    """The reference models this process has prepared in the compiled or onnxruntime runtime, so
    that a process measuring many candidates compiles or exports each reference once.

    Keyed by `reference_cache_key` (the reference's spec, runtime and version, device, threads,
    timed input shape, channels_last); at most `size` entries, the least recently used dropped.
    A hit reuses the first reference model prepared under that key: only its architecture matters
    for latency. `preparations` counts the references prepared (misses), for tests and logs.
    Compiled entries live in dynamo's caches, which every candidate's compilation grows:
    `compiles_per_reset` compilations after the last reset, dynamo is reset and the compiled
    entries dropped (prepared again on next use), which bounds those caches."""

    def __init__(self, size: int = 4, compiles_per_reset: int = 16) -> None:
        self.size = size
        self.compiles_per_reset = compiles_per_reset
        self.preparations = 0
        self.compiles_since_reset = 0
        self._entries: dict[tuple[Any, ...], _PreparedReference] = {}

    def get(self, key: tuple[Any, ...]) -> _PreparedReference | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._entries[key] = entry  # most recently used last
        return entry

    def put(self, key: tuple[Any, ...], entry: _PreparedReference) -> None:
        self.preparations += 1
        self._entries.pop(key, None)
        self._entries[key] = entry
        while len(self._entries) > self.size:
            self._entries.pop(next(iter(self._entries)))

    def reset_dynamo(self) -> None:
        """torch._dynamo.reset(), dropping the compiled references it invalidates."""
        torch._dynamo.reset()
        self.compiles_since_reset = 0
        for key in [k for k in self._entries if k[1] == "compiled"]:
            del self._entries[key]

    def clear(self) -> None:
        """Drop every prepared reference (and reset dynamo if a compiled one was held)."""
        if any(k[1] == "compiled" for k in self._entries):
            self.reset_dynamo()
        self._entries.clear()


#: This process's prepared references (ReferenceCache).
REFERENCES = ReferenceCache()


def reference_cache_key(reference: nn.Module, cfg: LatencyConfig, device: torch.device,
                        shape: Sequence[int]) -> tuple[Any, ...] | None:
    """The ReferenceCache key of `reference` measured under `cfg` on `device` for inputs of
    `shape`: (spec JSON, runtime, runtime version, device, threads, shape, channels_last); None
    (not cached) in eager, which prepares nothing, or for a model without an ArchSpec."""
    spec = getattr(reference, "spec", None)
    if cfg.runtime == "eager" or not isinstance(spec, ArchSpec):
        return None
    threads = cfg.threads if cfg.threads is not None else torch.get_num_threads()
    return (spec.model_dump_json(), cfg.runtime, runtime_version(cfg.runtime), str(device), threads,
            tuple(int(s) for s in shape), cfg.channels_last)


class _OrtForward:
    """An onnxruntime session bound once to the measurement's input (its memory, no copy per call)
    and to outputs that onnxruntime allocates on the device and that are never copied back."""

    def __init__(self, session: Any, x: torch.Tensor, device: torch.device) -> None:
        self._session = session
        self._x = x  # keeps the bound memory alive
        self._binding = session.io_binding()
        kind, index = ("cuda", device.index or 0) if device.type == "cuda" else ("cpu", 0)
        graph_input = session.get_inputs()[0]
        self._binding.bind_input(graph_input.name, kind, index, np.float32, list(x.shape), x.data_ptr())
        for output in session.get_outputs():
            self._binding.bind_output(output.name, kind, index)

    def __call__(self, x: torch.Tensor) -> None:
        self._session.run_with_iobinding(self._binding)


def _ort_session(path: Path, cfg: LatencyConfig, device: torch.device) -> Any:
    """An InferenceSession of `path`: `cfg.threads` intra- and inter-op threads (None: onnxruntime's
    default), sequential execution, all graph optimisations; the CUDA provider on CUDA."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = cfg.threads or 0
    options.inter_op_num_threads = cfg.threads or 0
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def check_runtime(cfg: LatencyConfig, device: torch.device) -> None:
    """ValueError/RuntimeError when `cfg.runtime` cannot run on `device` here (before anything is
    built): onnxruntime needs the package, and on CUDA its CUDA provider; it runs on cpu or cuda."""
    if cfg.runtime != "onnxruntime":
        return
    ort = _onnxruntime()
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"latency.runtime 'onnxruntime' runs on cpu or cuda, not {device.type}")
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ValueError("latency.runtime 'onnxruntime' on cuda: this onnxruntime has no "
                         f"CUDAExecutionProvider (it has {', '.join(ort.get_available_providers())}); "
                         "install onnxruntime-gpu, or measure on cpu")


def _dynamo_limits(models: int) -> contextlib.AbstractContextManager[Any]:
    """Raise dynamo's recompile limit so that `models` models with the same forward code (the
    finalists, the reference) are all compiled instead of quietly falling back to eager."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    limit = max(int(getattr(config, name)), 4 * models)
    changes = {name: limit}
    if hasattr(config, "accumulated_recompile_limit"):
        changes["accumulated_recompile_limit"] = max(config.accumulated_recompile_limit, 8 * models)
    elif hasattr(config, "accumulated_cache_size_limit"):
        changes["accumulated_cache_size_limit"] = max(config.accumulated_cache_size_limit, 8 * models)
    return config.patch(changes)


def trained_like(model: nn.Module) -> nn.Module:
    """A copy of `model` whose batch-norm statistics and affine parameters are not at their
    initial values (drawn from a private generator, seed 0): an exporter's graph optimiser removes
    what is zero in a fresh model (the conv biases that batch norm folds into are all zero before
    training), so a fresh model's ONNX graph is not the graph of the trained model a user
    downloads. Exported for the onnxruntime latency, the copy's graph is the trained one's
    (spsa_nas.export.onnx_graph_sha256 agrees). Other weights are kept: they are random already."""
    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)

    def draw(tensor: torch.Tensor, center: float) -> torch.Tensor:
        noise = torch.rand(tensor.shape, generator=generator, dtype=torch.float32) * 0.2 + 0.05
        return (center + noise).to(device=tensor.device, dtype=tensor.dtype)

    with torch.no_grad():
        for module in clone.modules():
            # nn.BatchNorm*d and torchvision's FrozenBatchNorm2d (detectors) alike
            if "BatchNorm" not in type(module).__name__:
                continue
            for name, center in (("running_mean", 0.0), ("running_var", 1.0), ("weight", 1.0), ("bias", 0.0)):
                tensor = getattr(module, name, None)
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    tensor.copy_(draw(tensor, center))
    return clone


@contextlib.contextmanager
def _in_runtime(named: Sequence[tuple[str, nn.Module]], cfg: LatencyConfig, device: torch.device,
                x: torch.Tensor, reference_key: tuple[Any, ...] | None = None) -> Iterator[list[_Prepared]]:
    """Each model (in eval mode on `device`) ready to be timed in `cfg.runtime`, each run once
    untimed: eager as it is; compiled by `torch.compile` (default mode, fullgraph: a model dynamo
    cannot capture whole is an error, not a figure of a partly eager model; the first call
    compiles, under inference mode like the timed calls); onnxruntime: a trained_like copy
    exported by spsa_nas.export.export_model_onnx (the exporter of the trial's download) for the
    timed input's shape, the graph hashed, and run by an InferenceSession bound to the input
    (_OrtForward). With `reference_key` (reference_cache_key), the first model is a reference
    taken from, or prepared once into, REFERENCES. A failure names the runtime and the model."""
    runtime = cfg.runtime
    if runtime == "eager":
        yield [_Prepared(model) for _, model in named]
        return
    check_runtime(cfg, device)
    cache = REFERENCES
    if runtime == "compiled":
        cached = cache.get(reference_key) if reference_key is not None else None
        if cached is None or cache.compiles_since_reset >= cache.compiles_per_reset:
            cache.reset_dynamo()  # a clean start; a cached reference survives between measurements
            cached = None
        prepared = []
        with _dynamo_limits(cache.compiles_since_reset + len(named) + 1):
            for index, (name, model) in enumerate(named):
                keyed = reference_key if index == 0 else None
                if keyed is not None and cached is not None:
                    begin = time.perf_counter()
                    with torch.inference_mode():
                        cached.runnable(x)
                    prepared.append(_Prepared(cached.runnable, time.perf_counter() - begin))
                    continue
                begin = time.perf_counter()
                try:
                    # a cached reference is a private copy: the caller's model is restored afterwards
                    target = copy.deepcopy(model) if keyed is not None else model
                    compiled = torch.compile(target, fullgraph=True)
                    with torch.inference_mode():
                        compiled(x)
                except Exception as exc:
                    raise RuntimeError(f"latency.runtime 'compiled': torch.compile of {name} failed: "
                                       f"{type(exc).__name__}: {exc}"[:4000]) from exc
                cache.compiles_since_reset += 1
                spent = time.perf_counter() - begin
                if keyed is not None:
                    cache.put(keyed, _PreparedReference(compiled, spent))
                prepared.append(_Prepared(compiled, spent))
            try:
                yield prepared
            finally:
                if reference_key is None:  # nothing worth keeping: leave dynamo as it was found
                    cache.reset_dynamo()
        return
    from spsa_nas.export import export_model_onnx, onnx_graph_sha256  # onnx, onnxscript: only here

    prepared = []
    with tempfile.TemporaryDirectory(prefix="spsa-nas-latency-") as tmp:
        for index, (name, model) in enumerate(named):
            keyed = reference_key if index == 0 else None
            cached = cache.get(keyed) if keyed is not None else None
            begin = time.perf_counter()
            try:
                if cached is not None:
                    forward = _OrtForward(cached.runnable, x, device)
                    forward(x)
                    prepared.append(_Prepared(forward, time.perf_counter() - begin, cached.graph_sha256))
                    continue
                path = export_model_onnx(trained_like(model), Path(tmp) / f"model-{index}.onnx",
                                         tuple(x.shape))
                session = _ort_session(path, cfg, device)
                forward = _OrtForward(session, x, device)
                forward(x)
            except Exception as exc:
                raise RuntimeError(f"latency.runtime 'onnxruntime': exporting or running {name} failed: "
                                   f"{type(exc).__name__}: {exc}"[:4000]) from exc
            spent, graph = time.perf_counter() - begin, onnx_graph_sha256(path)
            if keyed is not None:
                cache.put(keyed, _PreparedReference(session, spent, graph))
            prepared.append(_Prepared(forward, spent, graph))
            path.unlink()  # the session holds the graph
    yield prepared


def measure_group(models: Mapping[str, nn.Module], input_shape: Sequence[int], cfg: LatencyConfig,
                  device: str | torch.device, *, reference: nn.Module | None = None,
                  reference_name: str | None = None) -> dict[str, LatencyResult]:
    """Latency of several models measured side by side in this process (protocol "interleaved").

    Every model (and `reference`, when given) in eval mode under `torch.inference_mode`, on one
    fixed random input; `cfg.threads` torch threads (and, with `cfg.pin_cpus`, the measuring
    thread pinned to as many CPUs); warm-up (_warm_up) until each model's timing settles; then
    rounds of one block of calls per model, the order rotated every round, so that every model
    sees the same machine; blocks are added while any model's interval is wider than
    `cfg.max_ci_rel` of its estimate, within `cfg.max_time_s` per model. Each model's figure is
    the median of its block means with an order-statistic interval (median_ci); with a reference,
    also the median over rounds of the ratio of its block mean to the reference's of the same
    round, with its interval. Returns a result per name, and one for REFERENCE when given.
    Afterwards every model's training flags, device and memory format are restored.
    """
    if not models:
        raise ValueError("measure_group needs at least one model")
    if REFERENCE in models:
        raise ValueError(f"{REFERENCE!r} is the reference's name; name the models otherwise")
    dev = resolve_device(device)
    shape = full_input_shape(input_shape, cfg)
    x = _input(shape, cfg, dev)
    named = [*([(REFERENCE, reference)] if reference is not None else []), *models.items()]
    tracks = [_Track(name, model, events=cfg.runtime != "onnxruntime") for name, model in named]
    version = runtime_version(cfg.runtime)
    ref_key = reference_cache_key(reference, cfg, dev, shape) if reference is not None else None
    with (_prepared_models([model for _, model in named], cfg, dev), _threads(cfg.threads) as threads,
          _pinned(threads, cfg.pin_cpus) as affinity,
          _in_runtime(named, cfg, dev, x, ref_key) as prepared, torch.inference_mode()):
        for track, ready in zip(tracks, prepared, strict=True):
            track.model = ready.forward
            track.warmup += 1 if cfg.runtime != "eager" else 0  # the call that compiled / bound it
        _warm_up(tracks, x, cfg, dev)
        extensions = _time_rounds(tracks, x, cfg, dev, tracks[0] if reference is not None else None)
    clocks = cuda_clocks(dev) if dev.type == "cuda" else None
    now = time.time()
    ref_track = tracks[0] if reference is not None else None
    ref_ms = median_ci(ref_track.block_means, cfg.ci_level)[0] if ref_track is not None else None
    out = {}
    if reference is not None and cfg.runtime != "eager":
        # the runtime is part of what the reference is: a study's anchor (search_spaces.finalists)
        # is per reference name, so figures of different runtimes never share one
        reference_name = f"{reference_name or 'reference'} [{cfg.runtime} {version}]"
    for track, ready in zip(tracks, prepared, strict=True):
        center, low, high = median_ci(track.block_means, cfg.ci_level)
        versus = ref_track if track is not ref_track else None
        figure = median_ci(_figure_samples(track, versus), cfg.ci_level)  # the ratio's, or the time's
        ratio = figure if versus is not None else (None, None, None)
        out[track.name] = LatencyResult(
            **{**_spread(track.samples), "median_ms": center},
            repeats=len(track.samples), warmup=track.warmup, batch_size=cfg.batch_size,
            input_shape=shape, device=str(dev), device_name=device_name(dev), threads=threads,
            torch_version=torch.__version__, protocol="interleaved", ci_low_ms=low, ci_high_ms=high,
            ci_level=cfg.ci_level, blocks=len(track.block_means), block_size=track.calls,
            ci_extensions=extensions, converged=(figure[2] - figure[1]) <= cfg.max_ci_rel * figure[0],
            settled=track.settled, reference=reference_name if reference is not None else None,
            reference_ms=ref_ms, ratio=ratio[0], ratio_ci_low=ratio[1], ratio_ci_high=ratio[2],
            group_size=len(tracks), affinity=affinity, clocks=clocks, measured_at=now,
            runtime=cfg.runtime, runtime_version=version, prepare_s=ready.prepare_s,
            onnx_graph_sha256=ready.graph_sha256,
        )
    return out


def _measure_simple(model: nn.Module, shape: tuple[int, ...], cfg: LatencyConfig,
                    dev: torch.device) -> LatencyResult:
    """The first protocol: `cfg.warmup` calls, then single calls until `cfg.repeats` and
    `cfg.min_time_s`; the median of the calls, no interval."""
    x = _input(shape, cfg, dev)
    samples: list[int] = []
    version = runtime_version(cfg.runtime)
    with _prepared_models([model], cfg, dev), _threads(cfg.threads) as threads, \
            _pinned(threads, cfg.pin_cpus) as affinity, \
            _in_runtime([("candidate", model)], cfg, dev, x) as prepared, torch.inference_mode():
        ready = prepared[0]
        forward = ready.forward
        for _ in range(cfg.warmup):
            forward(x)
        _synchronize(dev)
        budget_ns = cfg.min_time_s * 1e9
        spent = 0
        while len(samples) < cfg.repeats or (spent < budget_ns and len(samples) < MAX_SAMPLES):
            _synchronize(dev)
            start = time.perf_counter_ns()
            forward(x)
            _synchronize(dev)
            samples.append(time.perf_counter_ns() - start)
            spent += samples[-1]
    return LatencyResult(
        **_spread([v / 1e6 for v in samples]), repeats=len(samples), warmup=cfg.warmup,
        batch_size=cfg.batch_size, input_shape=shape, device=str(dev), device_name=device_name(dev),
        threads=threads, torch_version=torch.__version__, protocol="simple", group_size=1,
        affinity=affinity, clocks=cuda_clocks(dev) if dev.type == "cuda" else None,
        measured_at=time.time(), runtime=cfg.runtime, runtime_version=version,
        prepare_s=ready.prepare_s, onnx_graph_sha256=ready.graph_sha256,
    )


def measure_latency(model: nn.Module, input_shape: Sequence[int], cfg: LatencyConfig,
                    device: str | torch.device, *, reference: nn.Module | None = None,
                    reference_name: str | None = None) -> LatencyResult:
    """Latency of one forward pass of a fixed batch of `cfg.batch_size` x `input_shape` on `device`.

    Protocol "interleaved" (the default): measure_group with this model and `reference`
    (reference_model(spec, cfg) in a trial); "simple": the first protocol (a fixed warm-up, then
    single synchronised calls timed with perf_counter_ns, at least `cfg.repeats` and until
    `cfg.min_time_s`; the median; no reference, no interval). Both run in eval mode under
    `torch.inference_mode` with `cfg.threads` torch threads, and restore the model's training
    flags, device and memory format and the thread count afterwards.
    """
    dev = resolve_device(device)
    shape = full_input_shape(input_shape, cfg)
    if cfg.protocol == "simple":
        return _measure_simple(model, shape, cfg, dev)
    return measure_group({"candidate": model}, shape, cfg, dev, reference=reference,
                         reference_name=reference_name)["candidate"]


def reference_spec(spec: ArchSpec, cfg: LatencyConfig) -> ArchSpec | None:
    """The fixed reference of `spec`'s space: its backbone with no attention at
    `cfg.reference_width` (same stem, input size, channels and classes); None when the config has
    no reference or uses the simple protocol."""
    if cfg.reference_width is None or cfg.protocol == "simple":
        return None
    return ArchSpec.plain(spec.backbone, stem=spec.stem, input_size=spec.input_size,
                          in_channels=spec.in_channels, num_classes=spec.num_classes,
                          width=cfg.reference_width)


def describe_reference(spec: ArchSpec) -> str:
    """A short name of a reference spec, e.g. "resnet18 w0.5 plain (cifar stem, 16 px)"."""
    return f"{spec.backbone} w{spec.width:g} plain ({spec.stem} stem, {spec.input_size} px)"


def reference_model(spec: ArchSpec, cfg: LatencyConfig) -> tuple[nn.Module, str] | None:
    """The reference model of `spec` (reference_spec) and its name, built without touching the
    global RNG (its weights do not matter for latency; a trial's training must not depend on
    whether it was built); None when there is no reference."""
    from spsa_nas.models import build_model  # the models import attention code; only here

    ref = reference_spec(spec, cfg)
    if ref is None:
        return None
    with torch.random.fork_rng(devices=[]):
        return build_model(ref), describe_reference(ref)


def latency_key(spec: ArchSpec, input_shape: Sequence[int], cfg: LatencyConfig,
                device: str | torch.device) -> str:
    """A stable hash of everything a latency figure depends on: the architecture (spec JSON), the
    timed input shape, the protocol (config), the hardware (device type and name), the thread count,
    the torch version, and the runtime with its version (onnxruntime's) unless it is eager.
    Weights are not part of it: they do not change latency."""
    dev = resolve_device(device)
    threads = cfg.threads if cfg.threads is not None else torch.get_num_threads()
    record: dict[str, Any] = {
        "version": KEY_VERSION,
        "spec": spec.model_dump(mode="json"),
        "input_shape": list(full_input_shape(input_shape, cfg)),
        # eager's key leaves the runtime out: it is the key eager figures had before runtimes existed
        "latency": cfg.model_dump(mode="json", exclude={"runtime"} if cfg.runtime == "eager" else None),
        "device_type": dev.type,
        "device_name": device_name(dev),
        "threads": threads,
        "torch": torch.__version__,
    }
    if cfg.runtime != "eager":
        record["runtime"] = [cfg.runtime, runtime_version(cfg.runtime)]
    blob = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
