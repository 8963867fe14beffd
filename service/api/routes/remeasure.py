"""POST /api/v1/searches/{id}/remeasure: ask for a finished search's finalists to be re-measured together;
the request is a row's column, which a coordinator's dispatcher picks up (the API imports no torch)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Request, Response, status

from search_spaces.finalists import finalist_trials
from service import crud
from service.api.deps import CurrentUser, RuntimeDep, SessionDep, SettingsDep
from service.api.routes.searches import NOT_FOUND_RESPONSE, SearchId, _study, find_search
from service.api.schemas import Message, RemeasurePublic, RemeasureStatus
from service.core.models import FINAL_STATES

log = logging.getLogger("spsa_nas.service")
router = APIRouter(prefix="/searches", tags=["searches"])
PENDING = "a re-measurement of this search is pending already"


@router.post(
    "/{search_id}/remeasure",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RemeasurePublic,
    responses={
        **NOT_FOUND_RESPONSE,
        409: {"model": Message, "description": "the search is not finished, has no finalist, or a "
                                               "re-measurement of it is pending already"},
        429: {"model": Message, "description": "over the per-user limit of pending re-measurements"},
    },
)
def remeasure_search(
    request: Request,
    response: Response,
    search_id: SearchId,
    session: SessionDep,
    user: CurrentUser,
    runtime: RuntimeDep,
    settings: SettingsDep,
) -> RemeasurePublic:
    """Re-measure the finished search's finalists (its Pareto front and the trials `best` could tie
    with) together, as at its end: a coordinator runs it when it has a free slot. Watch the search's
    `remeasure.state` (`Location`); `/best`, `/pareto` and `/trials` then answer the new figures."""
    search = find_search(session, search_id, user)
    if search.status not in FINAL_STATES:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"the search is {search.status}: its finalists are re-measured when it ends",
        )
    if search.remeasure_requested_at is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=PENDING)
    if not finalist_trials(_study(runtime, search)):  # type: ignore[arg-type]
        raise HTTPException(status.HTTP_409_CONFLICT,
                            detail="the search has no complete trial with a spec: nothing to re-measure")
    pending = crud.count_pending_remeasures(session, owner_id=search.owner_id)
    if pending >= settings.max_pending_remeasures_per_user:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"{pending} re-measurements of this user's searches are pending, the most allowed "
            f"(max_pending_remeasures_per_user={settings.max_pending_remeasures_per_user}; "
            "SPSA_NAS_MAX_PENDING_REMEASURES_PER_USER raises it)",
        )
    if not crud.request_remeasure(session, search_id=search.id):  # a racing request won
        raise HTTPException(status.HTTP_409_CONFLICT, detail=PENDING)
    session.refresh(search)
    log.info("search %s: re-measurement of its finalists asked by %s", search.id, user.name)
    base = str(request.url_for("read_search", search_id=search.id).path)
    response.headers["Location"] = base
    return RemeasurePublic(
        search_id=search.id,
        remeasure=RemeasureStatus.model_validate(crud.remeasure_status(search)),
        links={"search": base, **{name: f"{base}/{name}" for name in ("pareto", "best", "trials")}},
    )
