"""One trial: build a spec's model, measure params/FLOPs/latency, reject it or train and test it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from spsa_nas.config import DETECTION_LATENCY_RUNTIMES, DataConfig, LatencyConfig, TrainConfig
from spsa_nas.counting import count_flops, count_params
from spsa_nas.data import Splits, dataset_in_channels, dataset_num_classes, load_data
from spsa_nas.latency import (
    LatencyResult,
    check_runtime,
    latency_key,
    measure_latency,
    reference_model,
    resolve_device,
)
from spsa_nas.models import build_model
from spsa_nas.spec import ArchSpec
from spsa_nas.train import Cancelled, TrainReport, evaluate_accuracy, train_model

__all__ = ["Cancelled", "EvalHooks", "Fit", "LatencyCache", "Measurement", "TrialResult", "check_runtime_for",
           "check_spec_data", "evaluate_spec", "over_latency_budget", "scored_latency_ms"]


class LatencyCache(Protocol):
    """Where measured latencies are kept between trials (e.g. the study's storage)."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, value: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Measurement:
    """What is known before training: size, cost, latency, and whether the latency came cached."""

    params: int
    flops: int
    latency: LatencyResult
    cached: bool


@dataclass
class EvalHooks:
    """How a runner watches and steers a trial. Every hook is optional."""

    on_measured: Callable[[Measurement], None] | None = None  # after params/FLOPs/latency
    on_epoch: Callable[[int, float], None] | None = None  # (epoch 1-based, val_acc); may raise
    latency_lock: Callable[[], AbstractContextManager[None]] | None = None  # device to itself
    latency_cache: LatencyCache | None = None  # get(key) -> dict | None; put(key, dict)
    should_stop: Callable[[], bool] | None = None  # polled each step: cancel -> Cancelled
    # The figure the search scores for a measured latency (a trial: the ratio to the reference x
    # the study's anchor, docs/latency.md); the pre-training budget compares it. None: median_ms.
    latency_figure: Callable[[LatencyResult], float] | None = None


#: What gives a built model its weights instead of train_model: (model, splits, device, hooks) ->
#: the report (validation curve); e.g. the one-shot strategy's supernet weights + BN recalibration.
Fit = Callable[[nn.Module, Splits, torch.device, EvalHooks], TrainReport]


@dataclass
class TrialResult:
    """The outcome of one trial. Accuracies are fractions in [0, 1]; None where not measured."""

    spec: ArchSpec
    params: int
    flops: int
    latency: LatencyResult
    feasible: bool
    val_curve: list[float] = field(default_factory=list)
    val_acc: float | None = None
    val_loss: float | None = None  # validation cross-entropy, where the fit measured it (one-shot)
    top1: float | None = None
    top5: float | None = None
    epochs: int = 0
    train_seconds: float = 0.0
    model: nn.Module | None = None
    device: str = "cpu"

    def metrics(self) -> dict[str, Any]:
        """JSON-able dict whose keys are the trial user attrs of docs/CONTRACTS.md (no model)."""
        return {
            "params": self.params,
            "flops": self.flops,
            "latency": self.latency.to_dict(),
            "latency_ms": self.latency.median_ms,
            "feasible": self.feasible,
            "val_curve": list(self.val_curve),
            "val_acc": self.val_acc,
            "val_loss": self.val_loss,
            "top1": self.top1,
            "top5": self.top5,
            "epochs": self.epochs,
            "train_seconds": self.train_seconds,
            "device": self.device,
            "spec": self.spec.model_dump(mode="json"),
        }


def check_spec_data(spec: ArchSpec, data: DataConfig) -> None:
    """ValueError unless the spec's classes and input channels are the dataset's (cheap: no images)."""
    classes = dataset_num_classes(data)
    if spec.num_classes != classes:
        raise ValueError(f"spec.num_classes is {spec.num_classes} but dataset {data.name!r} has "
                         f"{classes} classes; set the space's num_classes to {classes}")
    channels = dataset_in_channels(data)
    if spec.in_channels != channels:
        raise ValueError(f"spec.in_channels is {spec.in_channels} but dataset {data.name!r} has "
                         f"{channels} channel(s); set the space's in_channels to {channels}")


def scored_latency_ms(lat: LatencyResult, hooks: EvalHooks) -> float:
    """The figure of `lat` the search scores: `hooks.latency_figure(lat)`, else the time measured."""
    return hooks.latency_figure(lat) if hooks.latency_figure is not None else lat.median_ms


def over_latency_budget(lat: LatencyResult, budget_ms: float | None, hooks: EvalHooks) -> bool:
    """Whether `lat` is over the pre-training budget, compared on the figure the search scores
    (scored_latency_ms), so a candidate is not rejected on a time the objective would not use."""
    return budget_ms is not None and scored_latency_ms(lat, hooks) > budget_ms


def check_runtime_for(spec: ArchSpec, cfg: LatencyConfig, device: torch.device) -> None:
    """ValueError when `cfg.runtime` cannot measure `spec` on `device`: a detector only in
    DETECTION_LATENCY_RUNTIMES; onnxruntime needs its package (and its CUDA provider on CUDA)."""
    if spec.task == "detection" and cfg.runtime not in DETECTION_LATENCY_RUNTIMES:
        raise ValueError(f"latency.runtime {cfg.runtime!r} cannot measure a detector: its data-dependent "
                         "box counts recompile torch.compile mid-measurement; use "
                         f"{' or '.join(DETECTION_LATENCY_RUNTIMES)}")
    if spec.task == "detection" and cfg.runtime == "onnxruntime" and cfg.batch_size != 1:
        raise ValueError("latency.runtime 'onnxruntime' measures a detector on one image (its ONNX graph "
                         f"takes one): set latency.batch_size 1, not {cfg.batch_size}")
    check_runtime(cfg, device)


def _cached(cache: LatencyCache | None, key: str) -> LatencyResult | None:
    if cache is None:
        return None
    record = cache.get(key)
    if record is None:
        return None
    try:
        return LatencyResult.from_dict(record)
    except (TypeError, ValueError):  # a record of another protocol version: measure afresh
        return None


Reference = Callable[[ArchSpec, LatencyConfig], "tuple[nn.Module, str] | None"]


def cached_latency(model: nn.Module, spec: ArchSpec, cfg: LatencyConfig, device: torch.device,
                   hooks: EvalHooks, reference: Reference | None = None) -> tuple[LatencyResult, bool]:
    """The latency of `model` (`spec`) in `cfg.runtime`, from the hooks' cache or measured under
    their lock, interleaved with `reference(spec, cfg)` (default: reference_model, the space's
    fixed plain model) in the same runtime; (result, whether it came from the cache). So a model
    is compiled or exported for latency once per distinct architecture and conditions (the key).
    ValueError first when the runtime cannot measure `spec` here (check_runtime_for)."""
    check_runtime_for(spec, cfg, device)
    shape = (spec.in_channels, spec.input_size, spec.input_size)
    key = latency_key(spec, shape, cfg, device)
    found = _cached(hooks.latency_cache, key)
    if found is not None:
        return found, True
    lock = hooks.latency_lock() if hooks.latency_lock is not None else contextlib.nullcontext()
    with lock:
        found = _cached(hooks.latency_cache, key)  # measured by another worker while we waited
        if found is not None:
            return found, True
        ref = (reference or reference_model)(spec, cfg)  # the space's fixed reference, timed interleaved
        if ref is not None:
            ref[0].to(device)
        result = measure_latency(model, shape, cfg, device, reference=ref[0] if ref else None,
                                 reference_name=ref[1] if ref else None)
    if hooks.latency_cache is not None:
        hooks.latency_cache.put(key, result.to_dict())
    return result, False


def evaluate_spec(
    spec: ArchSpec,
    *,
    data: DataConfig,
    train: TrainConfig,
    latency: LatencyConfig,
    device: str = "auto",
    latency_budget_ms: float | None = None,
    hooks: EvalHooks | None = None,
    fit: Fit | None = None,
    test: bool = True,
) -> TrialResult:
    """Run one trial of `spec`: measure, then (when within the latency budget) train and test.

    Order: resolve the device; check the spec against the dataset (classes, channels); build the
    model (initialised from `train.seed`); count parameters and FLOPs at (1, C, S, S) with S the
    spec's input size; latency at the spec's input size (from `hooks.latency_cache` when the same
    architecture was measured under the same conditions, else measured inside
    `hooks.latency_lock()` and cached; in `latency.runtime`); `hooks.on_measured`. Over
    `latency_budget_ms` (compared on the figure the search scores, `hooks.latency_figure`) → an
    infeasible result at once, without loading data or training. Otherwise load the data at
    `train.image_size` (default: the spec's input size), train (validation accuracy each epoch to
    `hooks.on_epoch`, whose exceptions propagate; `hooks.should_stop` polled each step → `Cancelled`)
    and test top-1/top-5 on the held-out split. The returned model is in eval mode on the CPU.
    `fit`: replaces the training (default train_model); everything else is the same.
    `test` False: the held-out split is not evaluated and top1/top5 stay None (a one-shot candidate:
    nothing ranks by an estimate's test accuracy; testing was ~1/6 of its time on digits).
    """
    hooks = hooks or EvalHooks()
    dev = resolve_device(device)
    check_spec_data(spec, data)
    check_runtime_for(spec, latency, dev)
    torch.manual_seed(train.seed)
    model = build_model(spec)
    params = count_params(model)
    flops = count_flops(model, (1, spec.in_channels, spec.input_size, spec.input_size))
    model.to(dev)
    lat, cached = cached_latency(model, spec, latency, dev, hooks)
    if hooks.on_measured is not None:
        hooks.on_measured(Measurement(params=params, flops=flops, latency=lat, cached=cached))
    result = TrialResult(spec=spec, params=params, flops=flops, latency=lat, feasible=True,
                         device=str(dev))
    if over_latency_budget(lat, latency_budget_ms, hooks):
        result.feasible = False
        return result
    if hooks.should_stop is not None and hooks.should_stop():
        raise Cancelled("stopped before training")

    splits = load_data(data, train.image_size or spec.input_size, spec.in_channels)
    if fit is None:
        report = train_model(model, splits.train, splits.val, train, dev, on_epoch=hooks.on_epoch,
                             should_stop=hooks.should_stop)
    else:
        report = fit(model, splits, dev, hooks)
    accuracy: dict[int, float | None] = {1: None, 5: None}
    if test:
        accuracy.update(evaluate_accuracy(model, splits.test, dev, topk=(1, 5), num_workers=train.num_workers,
                                          batch_size=max(train.batch_size, 256)))
    model.to("cpu").eval()
    result.val_curve = report.val_curve
    result.val_acc = report.val_curve[-1] if report.val_curve else None
    result.val_loss = report.val_loss
    result.top1 = accuracy[1]
    result.top5 = accuracy[5]
    result.epochs = report.epochs
    result.train_seconds = report.seconds
    result.model = model
    return result
