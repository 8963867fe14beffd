"""/api/v1/searches/{id}/best/weights and .../onnx: the chosen trial's weights and its ONNX export,
both files the workers stored as artifacts when the trial completed (nothing is built here)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse
from optuna.trial import FrozenTrial

from search_spaces.keys import ONNX_ARTIFACT_ATTR, ONNX_ERROR_ATTR, ONNX_SKIPPED_ATTR, WEIGHTS_ARTIFACT_ATTR
from service.api.deps import RuntimeDep
from service.api.routes.searches import NOT_FOUND_RESPONSE, BestChoice, Choice
from service.core.paths import artifact_file
from service.runtime import Runtime

router = APIRouter(prefix="/searches", tags=["searches"])


def _file_responses(what: str) -> dict[int | str, dict]:
    return {**NOT_FOUND_RESPONSE, 200: {"content": {"application/octet-stream": {}}, "description": what}}


def artifact_path(runtime: Runtime, trial: FrozenTrial, key: str, missing: str) -> Path:
    """The file of the trial's artifact `key`: its id (untrusted: read from the database) must have
    the shape the artifact store writes and resolve to a file directly under the artifact root."""
    path = artifact_file(runtime.settings.artifact_path, trial.user_attrs.get(key))
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"trial {trial.number} {missing}")
    return path


def _file(path: Path, choice: Choice, suffix: str) -> FileResponse:
    filename = f"{choice.search.id}-trial{choice.trial.number}.{suffix}"
    return FileResponse(path, media_type="application/octet-stream", filename=filename)


@router.get(
    "/{search_id}/best/weights", responses=_file_responses("safetensors file"), response_class=FileResponse
)
def download_weights(choice: BestChoice, runtime: RuntimeDep) -> FileResponse:
    """The best trial's trained weights (safetensors); load them with spsa_nas.build_model(spec, weights)."""
    path = artifact_path(runtime, choice.trial, WEIGHTS_ARTIFACT_ATTR, "has no stored weights")
    return _file(path, choice, "safetensors")


@router.get("/{search_id}/best/onnx", responses=_file_responses("ONNX file"), response_class=FileResponse)
def download_onnx(choice: BestChoice, runtime: RuntimeDep) -> FileResponse:
    """The best trial's model in ONNX, exported by the worker when the trial completed."""
    if ONNX_SKIPPED_ATTR in choice.trial.user_attrs:
        missing = f"has no ONNX export: {choice.trial.user_attrs[ONNX_SKIPPED_ATTR]}"
    elif ONNX_ERROR_ATTR in choice.trial.user_attrs:
        missing = "has no ONNX export: exporting it failed when the trial completed (download its weights)"
    else:
        missing = "has no ONNX export (trials that completed before exports were stored have none)"
    return _file(artifact_path(runtime, choice.trial, ONNX_ARTIFACT_ATTR, missing), choice, "onnx")
