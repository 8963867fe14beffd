"""/api/v1/searches/{id}/best/attention-map: the best model's SPSA attention maps as a PNG, on a sample
of the search's dataset (GET) or on the caller's image (POST), drawn in a child process (the API
imports no torch) under a concurrency cap and a time limit."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import Response

from search_spaces.keys import WEIGHTS_ARTIFACT_ATTR
from service.api.deps import RuntimeDep
from service.api.errors import FieldError
from service.api.routes.downloads import artifact_path
from service.api.routes.searches import NOT_FOUND_RESPONSE, BestChoice, Choice
from service.api.schemas import ValidationErrorPublic
from service.runtime import Runtime
from spsa_nas.image_files import ImageError, open_image

router = APIRouter(prefix="/searches", tags=["searches"])

IMAGE_TYPES = ("image/png", "image/jpeg")
MAX_MODULES = 64
JOB = "workers.maps_job"  # run as `python -m`, with the API's interpreter
CLIENT_ERROR = 2  # the job's exit status for a request the client can fix (workers.maps_job)
log = logging.getLogger("spsa_nas.service")
_slots_lock = threading.Lock()
_slots: dict[int, threading.BoundedSemaphore] = {}  # per settings value: the figures drawn at once

SampleQuery = Annotated[int, Query(ge=0, le=1_000_000, description="image of the validation split")]
ModulesQuery = Annotated[
    str | None,
    Query(max_length=2000,
          description="comma-separated blocks or modules, e.g. layer2.3 (default: every SPSA module)"),
]
PNG_RESPONSES: dict[int | str, dict] = {
    **NOT_FOUND_RESPONSE,
    200: {"content": {"image/png": {}},
          "description": "the figure: per SPSA module, its input, weight A and output"},
    415: {"description": "the body is not a PNG or JPEG (Content-Type image/png or image/jpeg)"},
    422: {"model": ValidationErrorPublic,
          "description": "a bad image (loc body), a module the model lacks (query.modules), a sample out of "
                         "range (query.sample): what no schema can say"},
    429: {"description": "the server is drawing as many figures as it allows at once"},
}


def _modules(text: str | None) -> list[str]:
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if len(names) > MAX_MODULES:
        raise FieldError([(("query", "modules"), f"at most {MAX_MODULES} names, got {len(names)}")])
    return names


def _client_error(stderr: bytes) -> tuple[tuple[str, ...], str]:
    """(loc, message) of the job's refusal: the last line of its stderr (workers.maps_job)."""
    lines = stderr.decode(errors="replace").strip().splitlines()
    try:
        problem = json.loads(lines[-1])
        return tuple(str(part) for part in problem["loc"]), str(problem["msg"])
    except (IndexError, ValueError, KeyError, TypeError):
        return ("body",), "the figure cannot be drawn from this request"


def _slot(runtime: Runtime) -> threading.BoundedSemaphore:
    limit = runtime.settings.max_concurrent_attention_maps
    with _slots_lock:
        return _slots.setdefault(limit, threading.BoundedSemaphore(limit))


def _draw(
    runtime: Runtime, choice: Choice, *, sample: int, modules: list[str], image: bytes | None
) -> Response:
    settings = runtime.settings
    weights = artifact_path(runtime, choice.trial, WEIGHTS_ARTIFACT_ATTR, "has no stored weights")
    request = {
        "storage": settings.db_url,
        "study": choice.search.study_name,
        "trial": choice.trial.number,
        "weights": str(weights),
        "sample": sample,
        "modules": modules,
        "image": base64.b64encode(image).decode() if image is not None else None,
        "title": f"search {choice.search.id}, trial {choice.trial.number}",
    }
    slot = _slot(runtime)
    if not slot.acquire(blocking=False):
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"the server draws at most {settings.max_concurrent_attention_maps} attention maps "
                   "at once (SPSA_NAS_MAX_CONCURRENT_ATTENTION_MAPS): retry shortly",
            headers={"Retry-After": "5"},
        )
    try:
        child = subprocess.Popen([sys.executable, "-m", JOB], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        if settings.trial_nice:  # like a trial: below the API's priority
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, child.pid, settings.trial_nice)
        try:
            png, errors = child.communicate(json.dumps(request).encode(),
                                            timeout=settings.attention_map_timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail=f"drawing the attention maps took longer than {settings.attention_map_timeout_s:g} s "
                       "(SPSA_NAS_ATTENTION_MAP_TIMEOUT_S)",
            ) from None
    finally:
        slot.release()
    if child.returncode == CLIENT_ERROR:
        raise FieldError([_client_error(errors)])
    if child.returncode != 0 or not png.startswith(b"\x89PNG"):
        log.error("attention map of search %s failed (exit %s):\n%s", choice.search.id, child.returncode,
                  errors.decode(errors="replace")[-2000:])
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR,
                            detail="drawing the attention maps failed on the server (logged)")
    filename = f"{choice.search.id}-trial{choice.trial.number}-attention.png"
    return Response(png, media_type="image/png",
                    headers={"Content-Disposition": f'inline; filename="{filename}"'})


@router.get("/{search_id}/best/attention-map", responses=PNG_RESPONSES, response_class=Response)
def read_attention_map(choice: BestChoice, runtime: RuntimeDep, sample: SampleQuery = 0,
                       modules: ModulesQuery = None) -> Response:
    """The best model's SPSA attention maps (the SPSA paper's Fig. 3) on image `sample` of the
    search's validation split: per SPSA module, its input (channel mean), weight A and output."""
    return _draw(runtime, choice, sample=sample, modules=_modules(modules), image=None)


IMAGE_BODY = {"requestBody": {"required": True, "content": {
    kind: {"schema": {"type": "string", "format": "binary"}} for kind in IMAGE_TYPES}}}


@router.post("/{search_id}/best/attention-map", responses=PNG_RESPONSES, response_class=Response,
             openapi_extra=IMAGE_BODY)
async def draw_attention_map(request: Request, choice: BestChoice, runtime: RuntimeDep,
                             modules: ModulesQuery = None) -> Response:
    """The same figure on your image: the body is the PNG or JPEG itself (Content-Type image/png or
    image/jpeg), at most the server's body limit; it is resized to the model's input size."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in IMAGE_TYPES:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            detail=f"send the image as the body with Content-Type "
                                   f"{' or '.join(IMAGE_TYPES)}, not {content_type or 'none'}")
    image = await request.body()
    if not image:
        raise FieldError([(("body",), "the body is empty: send a PNG or JPEG")])
    names = _modules(modules)
    try:  # not an image, too large: refused here, before a process is started for it
        open_image(image, decode=False)
    except ImageError as exc:
        raise FieldError([(("body",), str(exc))]) from None
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_draw, runtime, choice, sample=0, modules=names, image=image)
