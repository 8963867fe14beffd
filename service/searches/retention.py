"""Disk use of searches: prune a finished search's weights, measure a user's artifacts, free disk."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from search_spaces.keys import CONFIG_ATTR
from search_spaces.study import pareto_front, select_best, study_config
from service.core.paths import artifact_file
from service.core.settings import Settings

log = logging.getLogger("spsa_nas.service")

ARTIFACT_ATTRS = ("weights_artifact", "onnx_artifact")  # trial user attrs naming an artifact file
PRUNED_ATTR = "spsa_nas:weights_pruned"  # study system attr: numbers of the trials whose files went
ONNX_CACHE = "onnx"  # artifact_dir/onnx/<study>-trial<N>.onnx: ONNX exports cached by the API
Keep = Literal["all", "pareto", "top_k"]


@dataclass(frozen=True)
class Pruned:
    """What prune_artifacts did: the trials kept and pruned, and the bytes freed."""

    kept: list[int]
    pruned: list[int]
    freed_bytes: int


def _trial_files(artifact_dir: Path, study_name: str, trial: FrozenTrial) -> list[Path]:
    """The artifact files of `trial` (weights, ONNX), only those under the artifact root."""
    files = [artifact_file(artifact_dir, trial.user_attrs.get(attr)) for attr in ARTIFACT_ATTRS]
    cached = artifact_dir / ONNX_CACHE / f"{study_name}-trial{trial.number}.onnx"
    return [path for path in files if path is not None] + ([cached] if cached.is_file() else [])


def trials_to_keep(study: optuna.Study, keep: Keep, top_k: int) -> set[int]:
    """Numbers of the complete trials whose weights stay: all of them, the Pareto front (accuracy
    up, latency down) and the best trial, or the best `top_k` by the search's own ranking (score,
    else accuracy; ties to the lower latency, then the lower number)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if keep == "all":
        return {t.number for t in complete}
    if keep == "pareto":
        try:
            best = {select_best(study).number}
        except LookupError:
            best = set()
        return {t.number for t in pareto_front(study)} | best
    score = CONFIG_ATTR in study.user_attrs and study_config(study).objective.kind == "score"
    ranked = [t for t in complete if "val_acc" in t.user_attrs and "latency_ms" in t.user_attrs]

    def key(t: FrozenTrial) -> tuple[float, float, int]:
        primary = t.values[0] if score and t.values else t.user_attrs["val_acc"]
        return (-primary, t.user_attrs["latency_ms"], t.number)

    return {t.number for t in sorted(ranked, key=key)[:top_k]}


def prune_artifacts(
    storage: BaseStorage | str, study_name: str, *, artifact_dir: Path, keep: Keep = "pareto", top_k: int = 5
) -> Pruned:
    """Delete the weight and ONNX files of a finished search's trials but those `trials_to_keep`
    picks, and record the pruned trials' numbers in the study's system attr `PRUNED_ATTR` (a
    finished trial's own attrs cannot change). Safe to run again: it deletes only what is left."""
    storage = optuna.storages.get_storage(storage) if isinstance(storage, str) else storage
    study = optuna.load_study(study_name=study_name, storage=storage)
    kept = trials_to_keep(study, keep, top_k)
    pruned: list[int] = []
    freed = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.number in kept:
            continue
        files = _trial_files(artifact_dir, study_name, trial)
        for path in files:
            try:
                size = path.stat().st_size
                path.unlink()
                freed += size
            except FileNotFoundError:  # another pruner got there first
                pass
        if files or trial.user_attrs.get("weights_artifact"):
            pruned.append(trial.number)
    if pruned:
        study_id = storage.get_study_id_from_name(study_name)
        before = storage.get_study_system_attrs(study_id).get(PRUNED_ATTR) or []
        storage.set_study_system_attr(study_id, PRUNED_ATTR, sorted(set(before) | set(pruned)))
    log.info(
        "study %s: weights of %d trials pruned (%d bytes), %d kept", study_name, len(pruned), freed, len(kept)
    )
    return Pruned(kept=sorted(kept), pruned=sorted(pruned), freed_bytes=freed)


def prune_search(storage: BaseStorage | str, study_name: str, settings: Settings) -> Pruned:
    """prune_artifacts with the server's settings (`keep_weights`, `keep_top_k`)."""
    return prune_artifacts(
        storage,
        study_name,
        artifact_dir=settings.artifact_path,
        keep=settings.keep_weights,
        top_k=settings.keep_top_k,
    )


def pruned_trials(storage: BaseStorage, study_name: str) -> set[int]:
    """Numbers of the trials whose files prune_artifacts deleted (for a clear 404 on download)."""
    return set(
        storage.get_study_system_attrs(storage.get_study_id_from_name(study_name)).get(PRUNED_ATTR) or []
    )


def artifact_bytes(storage: BaseStorage, study_names: Iterable[str], *, artifact_dir: Path) -> int:
    """Bytes of the artifact files (weights, ONNX) of the trials of these studies."""
    total = 0
    for name in study_names:
        try:
            study_id = storage.get_study_id_from_name(name)
        except KeyError:  # a search whose study is gone
            continue
        for trial in storage.get_all_trials(study_id, deepcopy=False):
            for path in _trial_files(artifact_dir, name, trial):
                with contextlib.suppress(FileNotFoundError):  # pruned meanwhile
                    total += path.stat().st_size
    return total


def low_disk(settings: Settings) -> str | None:
    """A message when the artifact or the data directory's disk has less than
    `min_free_disk_bytes` free (no server path in it), else None."""
    for what, path in (("artifact", settings.artifact_path), ("data", settings.data_dir)):
        free = shutil.disk_usage(path).free
        if free < settings.min_free_disk_bytes:
            return (
                f"the server's {what} disk has {free} bytes free, under its threshold of "
                f"{settings.min_free_disk_bytes} (SPSA_NAS_MIN_FREE_DISK_BYTES): new searches are refused "
                "until the operator frees space"
            )
    return None
