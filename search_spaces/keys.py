"""The names spsa-nas stores in an Optuna study: study and trial user-attr keys, one place for all."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Study user attrs.
CONFIG_ATTR = "spsa_nas:config"  # the SearchConfig JSON: the one stored copy of a search's config
SPACE_ATTR = "spsa_nas:space"  # the resolved search space (workers need no file)
PHASE_ATTR = "spsa_nas:phase"  # oneshot: supernet, candidates, retrain or done (the search's phase);
# any search: reseed while its top-k are re-trained with more seeds at the end, then what it was
SUPERNET_ATTR = "spsa_nas:supernet"  # oneshot, studies before 2026-12: {key: record} of every supernet
SUPERNET_PREFIX = "spsa_nas:supernet:"  # + a supernet's key ("resnet18@w0.5"): its record {epoch,
# epochs, curve, checkpoint, done, workers, resumed_from, pid}, one attr each, so that supernets
# training at once never overwrite each other's (supernet_records reads both forms)
RETRAIN_ATTR = "spsa_nas:retrain"  # oneshot: the candidate trial numbers enqueued for retraining
ANCHOR_PREFIX = "spsa_nas:latency_anchor:"  # + a hash of the conditions: the reference's time in the
# first measurement of the study under them; latency_ms = ratio to the reference x this (docs/latency.md)
FINALISTS_ATTR = "spsa_nas:finalists"  # the last re-measurement of the finalists together: when,
# which trials, where, the reference's figure, or the error that stopped it (docs/latency.md)
SEEDS_ATTR = "spsa_nas:seeds"  # the top-k re-trained with more seeds (config `reseed`, spsa-nas reseed):
# accuracy by seed, mean and std per trial, stopped/error (search_spaces.finalists.seeds_record)
RUN_CANCEL_PREFIX = "spsa_nas:cancel:"  # + run id: True asks the tasks of that run to stop; written
# only by the run's coordinator, read by its tasks' heartbeats (cluster workers see only the database)


def run_cancel_attr(run_id: str) -> str:
    """The study user attr by which the coordinator of run `run_id` tells its tasks to stop."""
    if not run_id:
        raise ValueError("run_cancel_attr needs a non-empty run id")
    return RUN_CANCEL_PREFIX + run_id


def supernet_attr(key: str) -> str:
    """The study user attr holding the record of the supernet `key` (e.g. "resnet18@w0.5")."""
    if not key:
        raise ValueError("supernet_attr needs a non-empty supernet key")
    return SUPERNET_PREFIX + key


def supernet_records(attrs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every supernet's record in a study's user attrs, by key: the per-supernet attrs, over the
    one dict older studies kept under SUPERNET_ATTR."""
    older = attrs.get(SUPERNET_ATTR)
    records = {k: dict(v) for k, v in older.items() if isinstance(v, dict)} if isinstance(older, dict) else {}
    for name, value in attrs.items():
        if name.startswith(SUPERNET_PREFIX) and isinstance(value, dict):
            records[name[len(SUPERNET_PREFIX):]] = dict(value)
    return records


# Trial user attrs of the result (docs/CONTRACTS.md lists the metrics beside them).
ERROR_ATTR = "error"  # why a trial failed, one line
TRACEBACK_ATTR = "traceback"
REASON_ATTR = "reason"  # why a trial failed or was pruned, in words
LATENCY_KEY_ATTR = "latency_key"  # the latency cache's key of the trial's measurement
LATENCY_CI_ATTR = "latency_ci_ms"  # [low, high]: confidence interval of latency_ms (first pass)
LATENCY_RATIO_ATTR = "latency_ratio"  # latency / the reference's, measured interleaved (first pass)
LATENCY_RATIO_CI_ATTR = "latency_ratio_ci"  # [low, high] of that ratio
LATENCY_TIME_ATTR = "latency_time_ms"  # the candidate's own time (median of block means), ms
LATENCY_ANCHOR_ATTR = "latency_anchor_ms"  # the anchor latency_ms is on (ratio x anchor); None: time
REMEASURED_ATTR = "latency_remeasured"  # the LatencyResult dict of the finalists' re-measurement
REMEASURED_MS_ATTR = "latency_remeasured_ms"  # its figure (median of block means), ms
REMEASURED_CI_ATTR = "latency_remeasured_ci_ms"  # [low, high] of that figure
WEIGHTS_ARTIFACT_ATTR = "weights_artifact"  # artifact id of the trained weights (safetensors)
ONNX_ARTIFACT_ATTR = "onnx_artifact"  # artifact id of the ONNX export, made when the trial completed
LATENCY_RUNTIME_ATTR = "latency_runtime"  # "runtime version" of the latency figure (LatencyConfig.runtime)
ONNX_GRAPH_ATTR = "onnx_graph_sha256"  # the downloadable ONNX file's graph hash (spsa_nas.export.
# onnx_graph_sha256); with latency.runtime onnxruntime it equals the measured one in `latency`
ONNX_ERROR_ATTR = "onnx_error"  # why that export failed (the trial stays COMPLETE), one line
ONNX_SKIPPED_ATTR = "onnx_skipped"  # why no export was made (a one-shot candidate: when it is retrained)
ESTIMATE_ATTR = "oneshot_estimate"  # True: val_acc/top1/top5 come from the supernet's weights
RETRAIN_OF_ATTR = "retrain_of"  # number of the one-shot candidate this trial retrained from scratch
ONESHOT_SCORE_ATTR = "oneshot_score"  # what ranks a one-shot candidate (estimate "loss": exp(-val_loss))

# Trial user attrs of the runners.
RUNNER_ATTR = "runner"  # local runner: {"kind": "local", "host", "pid"} of the process running it
TASK_ATTR = "spsa_nas:task"  # Ray runner: the token of the task that owns the trial
HEARTBEAT_ATTR = "spsa_nas:heartbeat"  # {"seq": n, "time": unix seconds}, refreshed by the owner
RETRY_OF_ATTR = "retry_of"  # number of the trial this one re-runs (its worker was lost)
ATTEMPT_ATTR = "attempt"  # 0 for a fresh trial, k for the k-th re-run of the same parameters
WORKER_LOST_ATTR = "worker_lost"  # True on a trial failed because its worker vanished
CANCELLED_ATTR = "cancelled"  # True on a trial stopped by a cancellation

__all__ = [
    "ANCHOR_PREFIX",
    "ATTEMPT_ATTR",
    "CANCELLED_ATTR",
    "CONFIG_ATTR",
    "ERROR_ATTR",
    "ESTIMATE_ATTR",
    "FINALISTS_ATTR",
    "HEARTBEAT_ATTR",
    "LATENCY_ANCHOR_ATTR",
    "LATENCY_CI_ATTR",
    "LATENCY_KEY_ATTR",
    "LATENCY_RATIO_ATTR",
    "LATENCY_RATIO_CI_ATTR",
    "LATENCY_TIME_ATTR",
    "ONNX_ARTIFACT_ATTR",
    "ONNX_ERROR_ATTR",
    "ONNX_SKIPPED_ATTR",
    "PHASE_ATTR",
    "REASON_ATTR",
    "REMEASURED_ATTR",
    "REMEASURED_CI_ATTR",
    "REMEASURED_MS_ATTR",
    "RETRAIN_ATTR",
    "RETRAIN_OF_ATTR",
    "RETRY_OF_ATTR",
    "RUNNER_ATTR",
    "RUN_CANCEL_PREFIX",
    "SPACE_ATTR",
    "SUPERNET_ATTR",
    "SUPERNET_PREFIX",
    "TASK_ATTR",
    "TRACEBACK_ATTR",
    "WEIGHTS_ARTIFACT_ATTR",
    "WORKER_LOST_ATTR",
    "run_cancel_attr",
    "supernet_attr",
    "supernet_records",
]
