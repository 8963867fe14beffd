"""Latency in a runtime (LatencyConfig.runtime): eager, torch.compile and onnxruntime measure a tiny
model with its reference in the same runtime, record runtime + version, are cached apart, and the
onnxruntime figure is of the graph the download exporter writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig
from spsa_nas.evaluate import EvalHooks, cached_latency, check_runtime_for, evaluate_spec
from spsa_nas.export import export_model_onnx, export_onnx, onnx_graph_sha256
from spsa_nas.latency import REFERENCES, LatencyResult, latency_key, measure_latency, reference_model
from spsa_nas.models import build_model
from spsa_nas.spec import ArchSpec, StageSpec

SHAPE = (3, 16, 16)
# short: a figure, not a precise one (tests never assert times)
QUICK = {"blocks": 4, "repeats": 4, "max_time_s": 0.3, "max_warmup_s": 0.2, "block_ms": 5.0}


def _spec(spsa_stage: int = 1) -> ArchSpec:
    stages = [StageSpec(spsa=i == spsa_stage) for i in range(4)]
    return ArchSpec(backbone="resnet18", stem="cifar", input_size=16, in_channels=3, num_classes=10,
                    width=0.25, stages=stages)


class DictCache:
    """A real key-value latency cache backed by a dict."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.data[key] = value


def test_eager_records_runtime_and_torch_version() -> None:
    spec = _spec()
    ref = reference_model(spec, LatencyConfig())
    assert ref is not None
    result = measure_latency(build_model(spec), SHAPE, LatencyConfig(**QUICK), "cpu",
                             reference=ref[0], reference_name=ref[1])
    assert result.runtime == "eager" and result.runtime_version == torch.__version__
    assert result.onnx_graph_sha256 is None and result.prepare_s == 0.0
    assert result.reference == ref[1]  # eager keeps the reference's name (and the study anchors)
    assert result.ratio is not None and result.ratio > 0


def test_onnxruntime_measures_the_download_exporters_graph(tmp_path: Path) -> None:
    spec = _spec()
    model = build_model(spec)
    cfg = LatencyConfig(runtime="onnxruntime", **QUICK)
    ref = reference_model(spec, cfg)
    assert ref is not None
    result = measure_latency(model, SHAPE, cfg, "cpu", reference=ref[0], reference_name=ref[1])
    assert result.runtime == "onnxruntime" and result.runtime_version == onnxruntime.__version__
    assert result.median_ms > 0 and result.ratio is not None and result.prepare_s is not None
    assert result.reference == f"{ref[1]} [onnxruntime {onnxruntime.__version__}]"
    assert result.warmup >= 1  # the bound call that ran the session once, untimed
    # the graph measured is the one the trial's download writes (export_model_onnx) of the model
    # once trained: here other weights and batch-norm statistics moved by forward passes in train
    # mode (a fresh model's zero conv biases would be optimised away: latency.trained_like) ...
    torch.manual_seed(123)
    other = build_model(spec)
    with torch.no_grad():
        other(torch.randn(4, *SHAPE))
    downloaded = export_model_onnx(other.eval(), tmp_path / "download.onnx", (1, *SHAPE))
    assert onnx_graph_sha256(downloaded) == result.onnx_graph_sha256
    # ... and another architecture does not
    plain = export_onnx(build_model(_spec(spsa_stage=-1)), tmp_path / "plain.onnx", (1, *SHAPE))
    assert onnx_graph_sha256(plain) != result.onnx_graph_sha256
    # the model is left as it was (training flag)
    assert model.training


def test_a_process_exports_each_reference_once() -> None:
    """Candidates measured one after another against the same reference (spec, runtime, threads,
    input shape): the reference is exported and its session built once, counted by
    latency.REFERENCES (not timed); another thread count or input shape is another reference."""
    REFERENCES.clear()
    prepared = REFERENCES.preparations
    cfg = LatencyConfig(runtime="onnxruntime", threads=1, **QUICK)
    graphs = set()
    for stage in (1, 2, 1):
        spec = _spec(spsa_stage=stage)
        ref = reference_model(spec, cfg)  # a fresh module each time, as each trial builds it
        assert ref is not None
        result = measure_latency(build_model(spec), SHAPE, cfg, "cpu", reference=ref[0],
                                 reference_name=ref[1])
        assert result.ratio is not None and result.reference.startswith(ref[1])  # type: ignore[union-attr]
        graphs.add(result.onnx_graph_sha256)
    assert REFERENCES.preparations == prepared + 1
    assert len(graphs) == 2  # the candidates' own graphs, each exported
    spec = _spec()
    for changed, shape in ((cfg.model_copy(update={"threads": 2}), SHAPE), (cfg, (3, 8, 8))):
        ref = reference_model(spec, changed)
        assert ref is not None
        measure_latency(build_model(spec), shape, changed, "cpu", reference=ref[0], reference_name=ref[1])
    assert REFERENCES.preparations == prepared + 3
    REFERENCES.clear()


def test_onnxruntime_respects_threads_and_is_left_restored() -> None:
    before = torch.get_num_threads()
    cfg = LatencyConfig(runtime="onnxruntime", threads=2, protocol="simple", repeats=3, warmup=1)
    result = measure_latency(build_model(_spec()), SHAPE, cfg, "cpu")
    assert result.threads == 2 and result.runtime == "onnxruntime" and result.onnx_graph_sha256
    assert torch.get_num_threads() == before


def test_compiled_measures_with_the_reference_compiled_too() -> None:
    # torch.compile is slow on this machine: one case, the smallest model, a short measurement
    spec = _spec()
    cfg = LatencyConfig(runtime="compiled", **QUICK)
    ref = reference_model(spec, cfg)
    assert ref is not None
    REFERENCES.clear()
    prepared = REFERENCES.preparations
    result = measure_latency(build_model(spec), SHAPE, cfg, "cpu", reference=ref[0], reference_name=ref[1])
    assert result.runtime == "compiled" and result.runtime_version == torch.__version__
    assert result.prepare_s is not None and result.prepare_s > 0  # compiling, untimed
    assert result.reference == f"{ref[1]} [compiled {torch.__version__}]" and result.ratio is not None
    assert not isinstance(ref[0], torch._dynamo.eval_frame.OptimizedModule)  # the caller's model untouched
    assert ref[0].training  # and restored
    # another candidate, its reference built afresh as a trial does: compiled once in this process
    other = _spec(spsa_stage=2)
    again = reference_model(other, cfg)
    assert again is not None
    second = measure_latency(build_model(other), SHAPE, cfg, "cpu", reference=again[0],
                             reference_name=again[1])
    assert second.ratio is not None and REFERENCES.preparations == prepared + 1
    REFERENCES.clear()


class RefusesToCompile(nn.Module):
    """Runs eagerly, fails when dynamo traces it (a stand-in for a model torch.compile cannot take)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            raise NotImplementedError("this model does not compile")
        return self.conv(x)


def test_a_compile_failure_names_the_runtime_and_the_model() -> None:
    model = RefusesToCompile()
    model(torch.randn(1, 3, 4, 4))  # eager works
    cfg = LatencyConfig(runtime="compiled", protocol="simple", repeats=3, warmup=0)
    with pytest.raises(RuntimeError, match=r"latency.runtime 'compiled': torch.compile of candidate failed"):
        measure_latency(model, (3, 4, 4), cfg, "cpu")


def test_the_cache_keeps_runtimes_apart() -> None:
    spec = _spec()
    eager, onnx = LatencyConfig(**QUICK), LatencyConfig(runtime="onnxruntime", **QUICK)
    keys = {latency_key(spec, SHAPE, LatencyConfig(runtime=r, **QUICK), "cpu")
            for r in ("eager", "compiled", "onnxruntime")}
    assert len(keys) == 3
    cache = DictCache()
    hooks = EvalHooks(latency_cache=cache)
    model = build_model(spec)
    first, cached = cached_latency(model, spec, eager, torch.device("cpu"), hooks)
    assert not cached and first.runtime == "eager"
    second, cached = cached_latency(model, spec, onnx, torch.device("cpu"), hooks)
    assert not cached and second.runtime == "onnxruntime"  # not the eager figure
    third, cached = cached_latency(model, spec, onnx, torch.device("cpu"), hooks)
    assert cached and third == second  # once per architecture and runtime
    assert LatencyResult.from_dict(cache.data[latency_key(spec, SHAPE, onnx, "cpu")]).runtime == "onnxruntime"


def test_eager_key_is_the_key_from_before_runtimes() -> None:
    # eager figures cached before the runtime setting existed stay valid: the key leaves it out
    import hashlib
    import json

    from spsa_nas.latency import KEY_VERSION, device_name

    spec, cfg = _spec(), LatencyConfig()
    before = {"version": KEY_VERSION, "spec": spec.model_dump(mode="json"), "input_shape": [1, *SHAPE],
              "latency": {k: v for k, v in cfg.model_dump(mode="json").items() if k != "runtime"},
              "device_type": "cpu", "device_name": device_name(torch.device("cpu")), "threads": 1,
              "torch": torch.__version__}
    blob = json.dumps(before, sort_keys=True, separators=(",", ":"))
    assert latency_key(spec, SHAPE, cfg, "cpu") == hashlib.sha256(blob.encode()).hexdigest()


def test_runtime_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="runtime"):
        LatencyConfig(runtime="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="channels_last applies to the eager and compiled"):
        LatencyConfig(runtime="onnxruntime", channels_last=True)
    LatencyConfig(runtime="compiled", channels_last=True)  # fine


def test_old_records_load_without_runtime() -> None:
    record = measure_latency(nn.Conv2d(3, 3, 1), (3, 4, 4), LatencyConfig(protocol="simple", repeats=3),
                             "cpu").to_dict()
    for name in ("runtime", "runtime_version", "prepare_s", "onnx_graph_sha256"):
        del record[name]
    assert LatencyResult.from_dict(record).runtime is None


def _detection_spec() -> ArchSpec:
    return ArchSpec(backbone="resnet18", width=0.25, num_classes=3, input_size=64, task="detection",
                    detector={"name": "fasterrcnn", "fpn_channels": 16},
                    stages=[StageSpec(spsa=True), StageSpec(), StageSpec(), StageSpec()])


def test_onnxruntime_measures_a_detector_with_its_reference() -> None:
    from spsa_nas.detection.evaluate import reference_detector
    from spsa_nas.detection.model import build_detector

    spec = _detection_spec()
    cfg = LatencyConfig(runtime="onnxruntime", **QUICK)
    ref = reference_detector(spec, cfg)
    assert ref is not None
    result = measure_latency(build_detector(spec).eval(), (3, 64, 64), cfg, "cpu", reference=ref[0],
                             reference_name=ref[1])
    assert result.runtime == "onnxruntime" and result.ratio is not None and result.onnx_graph_sha256
    with pytest.raises(ValueError, match="batch_size 1"):
        check_runtime_for(spec, LatencyConfig(runtime="onnxruntime", batch_size=2), torch.device("cpu"))


def test_a_detector_is_refused_in_the_compiled_runtime_at_trial_time() -> None:
    from spsa_nas.detection.evaluate import evaluate_detection_spec

    with pytest.raises(ValueError, match=r"latency.runtime .compiled. cannot measure a detector"):
        evaluate_detection_spec(_detection_spec(), data=DataConfig(name="shapes", data_root="/nonexistent"),
                                train=TrainConfig(), latency=LatencyConfig(runtime="compiled"), device="cpu")


def test_the_budget_compares_the_figure_the_search_scores() -> None:
    # issue 15: the gate before training compares what the objective uses (hooks.latency_figure:
    # ratio x anchor in a trial), not the raw time of the moment
    spec = _spec()
    data = DataConfig(name="synthetic", synthetic_samples=64, synthetic_classes=10, synthetic_size=16)
    train = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=1)
    cfg = LatencyConfig(protocol="simple", repeats=3, warmup=1)
    hooks = EvalHooks(latency_cache=DictCache())
    raw = evaluate_spec(spec, data=data, train=train, latency=cfg, device="cpu", hooks=hooks,
                        latency_budget_ms=1e6)
    assert raw.feasible  # the control
    time_ms = raw.latency.median_ms
    # a scored figure over the budget rejects even though the time is well within it ...
    slow = EvalHooks(latency_cache=hooks.latency_cache, latency_figure=lambda lat: 100 * time_ms)
    rejected = evaluate_spec(spec, data=data, train=train, latency=cfg, device="cpu", hooks=slow,
                             latency_budget_ms=10 * time_ms)
    assert not rejected.feasible and rejected.model is None
    # ... and a scored figure within it trains even though the time of the moment is over it
    fast = EvalHooks(latency_cache=hooks.latency_cache, latency_figure=lambda lat: 0.01 * time_ms)
    kept = evaluate_spec(spec, data=data, train=train, latency=cfg, device="cpu", hooks=fast,
                         latency_budget_ms=0.1 * time_ms)
    assert kept.feasible and kept.model is not None
