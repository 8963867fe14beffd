"""/api/v1/searches/{id}/best/weights and .../onnx: the chosen trial's weights and its ONNX export."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse
from optuna.trial import FrozenTrial

from service.api.deps import RuntimeDep
from service.api.routes.searches import NOT_FOUND_RESPONSE, BestChoice, Choice
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


def _file(path: Path, choice: Choice, suffix: str) -> FileResponse:
    filename = f"{choice.search.id}-trial{choice.trial.number}.{suffix}"
    return FileResponse(path, media_type="application/octet-stream", filename=filename)


@router.get(
    "/{search_id}/best/weights", responses=_file_responses("safetensors file"), response_class=FileResponse
)
def download_weights(choice: BestChoice, runtime: RuntimeDep) -> FileResponse:
    """The best trial's trained weights (safetensors); load them with spsa_nas.build_model(spec, weights)."""
    return _file(_weights_path(runtime, choice.trial), choice, "safetensors")


@router.get("/{search_id}/best/onnx", responses=_file_responses("ONNX file"), response_class=FileResponse)
def download_onnx(choice: BestChoice, runtime: RuntimeDep) -> FileResponse:
    """The best trial's model exported to ONNX (built on first request, then cached)."""
    weights = _weights_path(runtime, choice.trial)
    name = f"{choice.search.study_name}-trial{choice.trial.number}.onnx"
    target = runtime.settings.artifact_path / "onnx" / name
    with runtime.export_lock:
        if not target.is_file():
            _export_onnx(choice.trial.user_attrs["spec"], weights, target)
    return _file(target, choice, "onnx")


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
