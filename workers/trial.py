"""run_trial: one ask'd Optuna trial from suggest_arch through evaluate_spec to tell (in-process)."""

from __future__ import annotations

import math
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import upload_artifact
from optuna.trial import FrozenTrial, TrialState

from search_spaces.config import SearchConfig
from search_spaces.finalists import anchor_ms, normalized
from search_spaces.keys import (
    ERROR_ATTR,
    LATENCY_ANCHOR_ATTR,
    LATENCY_CI_ATTR,
    LATENCY_KEY_ATTR,
    LATENCY_RATIO_ATTR,
    LATENCY_RATIO_CI_ATTR,
    LATENCY_RUNTIME_ATTR,
    LATENCY_TIME_ATTR,
    ONESHOT_SCORE_ATTR,
    ONNX_ARTIFACT_ATTR,
    ONNX_ERROR_ATTR,
    ONNX_GRAPH_ATTR,
    ONNX_SKIPPED_ATTR,
    REASON_ATTR,
    TRACEBACK_ATTR,
    WEIGHTS_ARTIFACT_ATTR,
)
from search_spaces.space import SearchSpace
from search_spaces.study import mnas_score, objective_values, oneshot_score
from search_spaces.suggest import suggest_arch
from spsa_nas.config import LatencyConfig
from spsa_nas.data import dataset_in_channels, dataset_num_classes
from spsa_nas.evaluate import Cancelled, EvalHooks, Fit, Measurement, evaluate_spec
from spsa_nas.latency import LatencyResult, full_input_shape
from workers.detection_trial import evaluate_detection


def latency_interval_attrs(latency: LatencyResult, study: optuna.Study) -> dict[str, Any]:
    """The trial user attrs of a latency measurement, scalars optuna-dashboard shows as columns:
    `latency_ms` (the figure the search uses: the ratio to the reference times the study's anchor,
    search_spaces.finalists.anchor_ms; the time itself without a reference) with its interval
    `latency_ci_ms`, the time `latency_time_ms`, the anchor, the ratio with its interval, and
    `latency_runtime` (what ran the timed calls and its version, e.g. "onnxruntime 1.20.1")."""
    record = latency.to_dict()
    anchor = anchor_ms(study, record)
    figure, interval = normalized(record, anchor)
    ratio = latency.ratio
    return {
        "latency_ms": figure,
        LATENCY_CI_ATTR: interval,
        LATENCY_TIME_ATTR: latency.median_ms,
        LATENCY_ANCHOR_ATTR: anchor,
        LATENCY_RATIO_ATTR: ratio,
        LATENCY_RATIO_CI_ATTR: [latency.ratio_ci_low, latency.ratio_ci_high] if ratio is not None else None,
        LATENCY_RUNTIME_ATTR: f"{latency.runtime or 'eager'} "
                              f"{latency.runtime_version or latency.torch_version}",
    }


class StudyLatencyCache:
    """Latency cache backed by the study's storage: earlier trials' `latency` user attrs by key.

    `get` also records the key on the current trial (user attr `latency_key`), so every trial
    says which measurement it has; `put` needs to store nothing more, because the measured
    latency lands in the trial's `latency` attr through `on_measured`.
    """

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        self._study = study
        self._trial = trial

    def get(self, key: str) -> dict[str, Any] | None:
        self._trial.set_user_attr(LATENCY_KEY_ATTR, key)
        for other in self._study.get_trials(deepcopy=False):
            attrs = other.user_attrs
            if (other.number != self._trial.number and attrs.get(LATENCY_KEY_ATTR) == key
                    and isinstance(attrs.get("latency"), dict)):
                return dict(attrs["latency"])
        return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        self._trial.set_user_attr(LATENCY_KEY_ATTR, key)


def _chain(*hooks: Callable[..., None] | None) -> Callable[..., None] | None:
    present = [h for h in hooks if h is not None]
    if not present:
        return None

    def call(*args: Any) -> None:
        for hook in present:
            hook(*args)

    return call


def _fail(study: optuna.Study, trial: optuna.Trial, error: str, tb: str) -> FrozenTrial:
    trial.set_user_attr(ERROR_ATTR, error)
    trial.set_user_attr(TRACEBACK_ATTR, tb)
    return study.tell(trial, state=TrialState.FAIL)


def _export_onnx(trial: optuna.Trial, model: Any, artifact_store: Any, latency: LatencyConfig) -> None:
    """Export the trained model to ONNX and store it as the trial's `onnx_artifact`, so that the
    API only streams a file; a failed export is recorded (`onnx_error`), never fails the trial.

    The exporter is the one the onnxruntime latency measurement uses (export_model_onnx), for the
    input the latency was measured at (batch latency.batch_size; a detector: one image), so that
    with latency.runtime onnxruntime the file downloaded is the graph measured: its weight-free
    hash (`onnx_graph_sha256`) equals the latency record's."""
    from spsa_nas.export import export_model_onnx, onnx_graph_sha256

    spec = getattr(model, "spec", None)
    shape = None
    if spec is not None and spec.task != "detection":
        shape = full_input_shape((spec.in_channels, spec.input_size, spec.input_size), latency)
    try:
        with tempfile.TemporaryDirectory(prefix="spsa-nas-") as tmp:
            path = export_model_onnx(model, Path(tmp) / f"trial-{trial.number}.onnx", shape)
            graph = onnx_graph_sha256(path)
            artifact_id = upload_artifact(artifact_store=artifact_store, file_path=str(path),
                                          study_or_trial=trial, mimetype="application/octet-stream")
    except Exception as exc:
        trial.set_user_attr(ONNX_ERROR_ATTR, f"{type(exc).__name__}: {exc}"[:2000])
        return
    trial.set_user_attr(ONNX_ARTIFACT_ATTR, artifact_id)
    trial.set_user_attr(ONNX_GRAPH_ATTR, graph)


def run_trial(study: optuna.Study, trial: optuna.Trial, cfg: SearchConfig, space: SearchSpace, *,
              artifact_store: Any, device: str | None = None,
              extra_hooks: EvalHooks | None = None, fit: Fit | None = None,
              skip_onnx: str | None = None, test: bool = True) -> FrozenTrial:
    """Suggest, evaluate and tell one trial; never raises for a failed trial (it is told FAIL).

    `artifact_store`: an Optuna artifact store (e.g. FileSystemArtifactStore) for the weights.

    Outcomes: COMPLETE with the objective values and every user attr of docs/CONTRACTS.md (the
    weights uploaded as an Optuna artifact, `weights_artifact`, and their ONNX export,
    `onnx_artifact`, or `onnx_error` when the export failed); PRUNED when infeasible (latency
    over the budget: `feasible=False`, `reason`) or stopped by the pruner (score objective);
    FAIL with `error` and `traceback` on an exception, or `error="cancelled"` when
    `extra_hooks.should_stop` stopped it. KeyboardInterrupt tells FAIL ("interrupted") and is
    re-raised. `extra_hooks`: its latency_lock/should_stop/latency_cache are used, its
    on_measured/on_epoch are called after this runner's own. `fit`: evaluate_spec's (how the
    model gets its weights; default: trained from scratch). `skip_onnx`: no ONNX export, this reason
    recorded as `onnx_skipped` instead (a one-shot candidate: exporting cost ~70 % of its evaluation;
    it is exported when it is retrained). `test` False: the test split is not evaluated (top1/top5
    are None; a one-shot candidate: see evaluate_spec).
    """
    extra = extra_hooks or EvalHooks()
    state: dict[str, float] = {}

    def on_measured(m: Measurement) -> None:
        figures = latency_interval_attrs(m.latency, study)
        state["latency_ms"] = figures["latency_ms"]
        trial.set_user_attr("params", m.params)
        trial.set_user_attr("flops", m.flops)
        trial.set_user_attr("latency", m.latency.to_dict())
        trial.set_user_attr("latency_cached", m.cached)
        for key, value in figures.items():
            trial.set_user_attr(key, value)

    curve: list[float] = []

    def on_epoch(epoch: int, val_acc: float) -> None:
        curve.append(val_acc)
        trial.set_user_attr("val_curve", list(curve))
        if cfg.objective.kind != "score":
            return  # Optuna's pruners compare one value; the pareto objective has two
        trial.report(mnas_score(val_acc, state["latency_ms"], cfg.objective), epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned by the {cfg.pruner} pruner after epoch {epoch}")

    hooks = EvalHooks(
        on_measured=_chain(on_measured, extra.on_measured),
        on_epoch=_chain(on_epoch, extra.on_epoch),
        latency_lock=extra.latency_lock,
        latency_cache=extra.latency_cache or StudyLatencyCache(study, trial),
        should_stop=extra.should_stop,
        # the budget compares the figure the objective scores (ratio x the study's anchor)
        latency_figure=lambda lat: latency_interval_attrs(lat, study)["latency_ms"],
    )
    try:
        num_classes = dataset_num_classes(cfg.dataset) if space.num_classes is None else None
        in_channels = dataset_in_channels(cfg.dataset) if space.in_channels is None else None
        spec = suggest_arch(trial, space, num_classes=num_classes, in_channels=in_channels)
        trial.set_user_attr("spec", spec.model_dump(mode="json"))
        evaluate = evaluate_detection if spec.task == "detection" else evaluate_spec
        result = evaluate(spec, data=cfg.dataset, train=cfg.train, latency=cfg.latency,
                          device=device or cfg.device,
                          latency_budget_ms=cfg.objective.latency_budget_ms, hooks=hooks,
                          fit=fit, test=test)
        metrics = {**result.metrics(), "latency_ms": state["latency_ms"]}  # the figure on_measured chose
        if not result.feasible:
            for key in ("params", "flops", "latency", "latency_ms", "feasible", "device"):
                trial.set_user_attr(key, metrics[key])
            trial.set_user_attr(REASON_ATTR, f"latency {state['latency_ms']:.3f} ms (the figure the "
                                          f"search scores) is over the budget of "
                                          f"{cfg.objective.latency_budget_ms:g} ms")
            return study.tell(trial, state=TrialState.PRUNED)
        values = objective_values(metrics, cfg)
        score = oneshot_score(metrics, cfg)
        if score is not None:
            metrics[ONESHOT_SCORE_ATTR] = score
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"objective values are not finite: {values}")
        if result.model is None:
            raise RuntimeError("evaluate_spec returned a feasible result without a model")
        from spsa_nas.export import save_safetensors  # torch-heavy; only when there is a model

        with tempfile.TemporaryDirectory(prefix="spsa-nas-") as tmp:
            path = Path(tmp) / f"trial-{trial.number}.safetensors"
            save_safetensors(result.model, path)
            artifact_id = upload_artifact(artifact_store=artifact_store, file_path=str(path),
                                          study_or_trial=trial, mimetype="application/octet-stream")
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr(WEIGHTS_ARTIFACT_ATTR, artifact_id)
        if skip_onnx is None:
            _export_onnx(trial, result.model, artifact_store, cfg.latency)
        else:
            trial.set_user_attr(ONNX_SKIPPED_ATTR, skip_onnx)
        return study.tell(trial, values)
    except optuna.TrialPruned as exc:
        trial.set_user_attr(REASON_ATTR, str(exc) or "pruned")
        return study.tell(trial, state=TrialState.PRUNED)
    except Cancelled:
        return _fail(study, trial, "cancelled", traceback.format_exc())
    except KeyboardInterrupt:
        _fail(study, trial, "interrupted", traceback.format_exc())
        raise
    except Exception as exc:
        return _fail(study, trial, f"{type(exc).__name__}: {exc}", traceback.format_exc())
