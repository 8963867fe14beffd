"""GET /api/v1/searches/{id}/compare: a search's completed trials by architecture choice (the ablation
table of search_spaces.compare), for a finished search or a running one so far."""

from __future__ import annotations

from fastapi import APIRouter

from search_spaces.compare import compare_study
from service.api.deps import CurrentUser, RuntimeDep, SessionDep
from service.api.routes.searches import NOT_FOUND_RESPONSE, SearchId, _study, find_search
from service.api.schemas import ComparePublic
from service.core.models import FINAL_STATES

router = APIRouter(prefix="/searches", tags=["searches"])


@router.get("/{search_id}/compare", response_model=ComparePublic, responses=NOT_FOUND_RESPONSE)
def read_compare(
    search_id: SearchId, session: SessionDep, user: CurrentUser, runtime: RuntimeDep
) -> ComparePublic:
    """The search's completed trials grouped by choice (spatial attention: none, SPSA, non-local, GC;
    SPSA's reverse and similarity; channel attention), per stage and over all stages: n, mean and
    spread of accuracy, mean latency per cell. A search not finished answers its trials so far
    (`finished: false`)."""
    search = find_search(session, search_id, user)
    study = _study(runtime, search)
    summary = compare_study(study)  # type: ignore[arg-type]
    return ComparePublic(
        search_id=search.id, status=search.status, finished=search.status in FINAL_STATES, **summary
    )
