"""/api/v1/searches/{id}/best/weights and .../onnx: the chosen trial's weights and its ONNX export."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse
from optuna.trial import FrozenTrial

from service.api.deps import CurrentUser, RuntimeDep, SessionDep
from service.api.routes.searches import (
    NOT_FOUND_RESPONSE,
    BudgetQuery,
    SearchId,
    TrialQuery,
    best_trial,
    find_search,
)
from service.core.models import Search
from service.core.paths import artifact_file
from service.runtime import Runtime

router = APIRouter(prefix="/searches", tags=["searches"])


def _file_responses(what: str) -> dict[int | str, dict]:
    return {**NOT_FOUND_RESPONSE, 200: {"content": {"application/octet-stream": {}}, "description": what}}


def _weights_path(runtime: Runtime, trial: FrozenTrial) -> Path:
    """The trial's weights file: its artifact id (untrusted: read from the database) must have the
    shape the artifact store writes and resolve to a file directly under the artifact root."""
    path = artifact_file(runtime.settings.artifact_path, trial.user_attrs.get("weights_artifact"))
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"trial {trial.number} has no stored weights")
    return path


def _chosen(
    runtime: Runtime,
    session: SessionDep,
    user: CurrentUser,
    search_id: str,
    latency_budget_ms: float | None,
    trial: int | None,
) -> tuple[Search, FrozenTrial, Path]:
    """The caller's search, the trial `best` picks with these parameters, and its weights file."""
    search = find_search(session, search_id, user)
    chosen = best_trial(runtime, search, latency_budget_ms, trial)
    return search, chosen, _weights_path(runtime, chosen)


def _file(path: Path, search: Search, trial: FrozenTrial, suffix: str) -> FileResponse:
    return FileResponse(
        path, media_type="application/octet-stream", filename=f"{search.id}-trial{trial.number}.{suffix}"
    )


@router.get(
    "/{search_id}/best/weights", responses=_file_responses("safetensors file"), response_class=FileResponse
)
def download_weights(
    search_id: SearchId,
    session: SessionDep,
    user: CurrentUser,
    runtime: RuntimeDep,
    latency_budget_ms: BudgetQuery = None,
    trial: TrialQuery = None,
) -> FileResponse:
    """The best trial's trained weights (safetensors); load them with spsa_nas.build_model(spec, weights)."""
    search, chosen, weights = _chosen(runtime, session, user, search_id, latency_budget_ms, trial)
    return _file(weights, search, chosen, "safetensors")


@router.get("/{search_id}/best/onnx", responses=_file_responses("ONNX file"), response_class=FileResponse)
def download_onnx(
    search_id: SearchId,
    session: SessionDep,
    user: CurrentUser,
    runtime: RuntimeDep,
    latency_budget_ms: BudgetQuery = None,
    trial: TrialQuery = None,
) -> FileResponse:
    """The best trial's model exported to ONNX (built on first request, then cached)."""
    search, chosen, weights = _chosen(runtime, session, user, search_id, latency_budget_ms, trial)
    target = runtime.settings.artifact_path / "onnx" / f"{search.study_name}-trial{chosen.number}.onnx"
    with runtime.export_lock:
        if not target.is_file():
            _export_onnx(chosen.user_attrs["spec"], weights, target)
    return _file(target, search, chosen, "onnx")


def _export_onnx(spec_json: dict, weights: Path, target: Path) -> None:
    from safetensors.torch import load_file

    from spsa_nas import ArchSpec, build_model
    from spsa_nas.export import export_onnx

    spec = ArchSpec.model_validate(spec_json)
    model = build_model(spec, weights=load_file(str(weights))).eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial.onnx")
    export_onnx(model, partial)
    partial.replace(target)
