"""/api/v1/searches: submit, list, watch, cancel a search; its trials, Pareto front and best model
(its downloads: routes/downloads.py)."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from search_spaces.finalists import ACCURACY_TOLERANCE, remeasurement
from search_spaces.run import RunReport
from search_spaces.study import create_study, pareto_front
from service import crud
from service.api.deps import CurrentUser, RuntimeDep, SessionDep, SettingsDep
from service.api.errors import NOT_FOUND, FieldError
from service.api.schemas import (
    BestPublic,
    Links,
    Message,
    PriorityUpdate,
    RemeasureStatus,
    SearchCreate,
    SearchesPublic,
    SearchPublic,
    SearchStatus,
    SearchSummary,
    TiePublic,
    TrialsPublic,
    TrialStateName,
    ValidationErrorPublic,
)
from service.core.models import CANCELLED, FINAL_STATES, Search, User
from service.core.redact import redact_json, redact_paths
from service.runtime import Runtime
from service.searches import results
from service.searches.cache import StudyView
from service.searches.submit import build_config, check_admission, study_name_for

log = logging.getLogger("spsa_nas.service")
router = APIRouter(prefix="/searches", tags=["searches"])
NOT_FOUND_RESPONSE: dict[int | str, dict] = {
    404: {"model": Message, "description": "no such search, or not yours"}
}
SearchId = Annotated[str, "a search id"]
# OpenAPI links of a created search: where its id goes next (operationId: the route's name)
CREATED_LINKS = {
    operation: {"operationId": operation, "parameters": {"search_id": "$response.body#/id"}}
    for operation in (
        "read_search",
        "read_trials",
        "read_pareto",
        "read_best",
        "download_weights",
        "download_onnx",
        "cancel_search",
    )
}


def _links(request: Request, search: Search, runtime: Runtime) -> Links:
    base = str(request.url_for("read_search", search_id=search.id).path)
    study_id = runtime.studies.study_id(search.study_name) if runtime.settings.dashboard else None
    return Links(
        self=base,
        trials=f"{base}/trials",
        dashboard=f"/dashboard/studies/{study_id}" if study_id is not None else None,
    )


def find_search(session: SessionDep, search_id: str, user: CurrentUser) -> Search:
    """The caller's search (any search for an admin), or 404 alike for a missing and a foreign id."""
    search = crud.get_search(session, search_id=search_id, user=user)
    if search is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=NOT_FOUND)
    return search


def _summary_fields(request: Request, search: Search, runtime: Runtime) -> dict[str, Any]:
    """What a search's line in the list (SearchSummary) says; its full answer says more."""
    return {
        "id": search.id,
        "name": search.name,
        "owner": search.owner.name,
        "status": search.status,
        "created_at": search.created_at,
        "finished_at": search.finished_at,
        "links": _links(request, search, runtime),
    }


def _public(request: Request, search: Search, runtime: Runtime, *, with_progress: bool) -> SearchPublic:
    config = runtime.studies.config(search.study_name) or {}  # stored once: with the study
    progress = None
    if with_progress:
        study = study_view(runtime, search)
        progress = results.progress(search, study, int(config.get("trials", 0)))
    return SearchPublic(
        **_summary_fields(request, search, runtime),
        study_name=search.study_name,
        started_at=search.started_at,
        # Answers carry no server paths (exception messages, the data root in the config); the
        # stored row and the logs keep them for the operator.
        error=redact_paths(search.error, runtime.settings) if search.error else None,
        config=redact_json(config, runtime.settings),
        progress=progress,
        summary=_report(search, runtime),
        remeasure=RemeasureStatus.model_validate(crud.remeasure_status(search)),
    )


def _report(search: Search, runtime: Runtime) -> RunReport | None:
    """The runner's report stored when the search ended (None before that, and for a row written
    before reports were typed), with no server paths in it."""
    if not search.result:
        return None
    try:
        return RunReport.model_validate(redact_json(json.loads(search.result), runtime.settings))
    except (ValueError, ValidationError):
        log.warning("search %s: its stored result is not a RunReport; answered without it", search.id)
        return None


def _new_search_ids(user: User, body: SearchCreate, runtime: Runtime) -> tuple[str, str]:
    """A new search id and its study's name (owner, space, dataset and the id's first 8 hex
    digits: what a person recognises in optuna-dashboard); drawn again if the name is taken."""
    for _ in range(8):
        search_id = str(uuid.uuid4())
        name = study_name_for(
            owner=user.name, space=body.space, dataset=body.dataset.name, search_id=search_id
        )
        if runtime.studies.study_id(name) is None:
            return search_id, name
    raise RuntimeError("no free study name after 8 draws")  # 32 random bits each: never in practice


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=SearchPublic,
    responses={
        201: {"links": CREATED_LINKS},
        400: {"model": Message, "description": "the body is not JSON (e.g. not UTF-8)"},
        413: {"model": Message, "description": "the body is over the server's size limit"},
        422: {"model": ValidationErrorPublic, "description": "a field is wrong or over a quota"},
        429: {
            "model": Message,
            "description": "over a per-user quota (active or queued searches, artifact bytes)",
        },
        507: {"model": Message, "description": "the server's disk is nearly full: no new searches"},
    },
)
def create_search(
    request: Request,
    body: SearchCreate,
    session: SessionDep,
    user: CurrentUser,
    runtime: RuntimeDep,
    settings: SettingsDep,
) -> SearchPublic:
    """Queue a search; the dispatcher starts it. Answers with its id, status and links."""
    search_id, study_name = _new_search_ids(user, body, runtime)
    cluster = crud.cluster_resources(session, fresh_s=settings.lease_s)  # None: no coordinator lately
    config = build_config(body, settings=settings, study_name=study_name, cluster=cluster)
    check_admission(session, user=user, settings=settings, storage=runtime.storage)
    try:
        create_study(config, runtime.storage)
    except ValueError as exc:  # e.g. a space/dataset combination the search engine refuses
        raise FieldError([(("body",), redact_paths(str(exc), settings))]) from None
    search = crud.create_search(
        session,
        search_id=search_id,
        owner=user,
        name=body.name,
        study_name=config.study_name,
    )
    session.commit()
    log.info("search %s queued by %s", search.id, user.name)
    return _public(request, search, runtime, with_progress=False)


@router.get("", response_model=SearchesPublic)
def list_searches(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    runtime: RuntimeDep,
    skip: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    status_: Annotated[SearchStatus | None, Query(alias="status")] = None,
) -> SearchesPublic:
    """Your searches (all searches for an admin), newest first."""
    rows, count = crud.list_searches(session, user=user, skip=skip, limit=limit, status=status_)
    data = [SearchSummary(**_summary_fields(request, s, runtime)) for s in rows]
    return SearchesPublic(data=data, count=count)


@router.get("/{search_id}", response_model=SearchPublic, responses=NOT_FOUND_RESPONSE)
def read_search(
    request: Request, search_id: SearchId, session: SessionDep, user: CurrentUser, runtime: RuntimeDep
) -> SearchPublic:
    """Status and progress: trial counts, best so far, timings."""
    return _public(request, find_search(session, search_id, user), runtime, with_progress=True)


# The last on-demand re-measurement's end this process saw, per search: a finished search's snapshot
# is cached for good (StudyCache), so one re-measured since is reloaded once, here.
_REMEASURED_SEEN: dict[str, datetime | None] = {}
_REMEASURED_LOCK = threading.Lock()


def study_view(runtime: Runtime, search: Search) -> StudyView | None:
    """The search's study snapshot (None when the study is gone), reloaded when a re-measurement of
    its finalists finished since this process last looked (the row says when)."""
    finished = search.remeasure_finished_at
    with _REMEASURED_LOCK:
        seen = _REMEASURED_SEEN.get(search.id, finished)
        _REMEASURED_SEEN[search.id] = finished
    if seen != finished:
        runtime.studies.forget(search.study_name)  # its figures changed since that snapshot
    return runtime.studies.view(search.study_name, final=search.status in FINAL_STATES)


def _study(runtime: Runtime, search: Search) -> StudyView:
    study = study_view(runtime, search)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="the search's study is gone from the storage")
    return study


@router.get("/{search_id}/trials", response_model=TrialsPublic, responses=NOT_FOUND_RESPONSE)
def read_trials(
    search_id: SearchId,
    session: SessionDep,
    user: CurrentUser,
    runtime: RuntimeDep,
    skip: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    state: Annotated[list[TrialStateName] | None, Query(description="filter by trial state")] = None,
) -> TrialsPublic:
    """The search's trials in order of their number."""
    study = _study(runtime, find_search(session, search_id, user))
    trials = study.get_trials(deepcopy=False, states=tuple(TrialState[s] for s in state) if state else None)
    record = remeasurement(study)  # type: ignore[arg-type]
    return TrialsPublic(
        data=[
            results.trial_public(t, settings=runtime.settings, record=record)
            for t in trials[skip : skip + limit]
        ],
        count=len(trials),
    )


@router.get("/{search_id}/pareto", response_model=TrialsPublic, responses=NOT_FOUND_RESPONSE)
def read_pareto(
    search_id: SearchId, session: SessionDep, user: CurrentUser, runtime: RuntimeDep
) -> TrialsPublic:
    """The non-dominated trials (accuracy vs first-pass latency; the best trial for a score search),
    with the finalists' re-measured latencies (`latency_remeasured_*`) beside the first-pass ones."""
    study = _study(runtime, find_search(session, search_id, user))
    front = pareto_front(study)  # type: ignore[arg-type]
    record = remeasurement(study)  # type: ignore[arg-type]
    return TrialsPublic(
        data=[results.trial_public(t, settings=runtime.settings, record=record) for t in front],
        count=len(front),
    )


@router.post(
    "/{search_id}/cancel",
    response_model=SearchPublic,
    responses={**NOT_FOUND_RESPONSE, 409: {"model": Message, "description": "already finished"}},
)
def cancel_search(
    request: Request, search_id: SearchId, session: SessionDep, user: CurrentUser, runtime: RuntimeDep
) -> SearchPublic:
    """Stop a search: a queued one at once, a running one after its trials in flight stop."""
    search = find_search(session, search_id, user)
    if search.status in FINAL_STATES:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"the search is already {search.status}")
    # One fact: the row's status, changed only from the state it is in (a claim or a finish racing
    # this request is never overwritten). The coordinator running the search polls it and stops.
    after = crud.cancel_search_row(session, search_id=search.id)
    session.refresh(search)
    if after in FINAL_STATES and after != CANCELLED:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"the search is already {after}")
    return _public(request, search, runtime, with_progress=False)


def best_trial(
    runtime: Runtime, search: Search, latency_budget_ms: float | None, trial: int | None
) -> FrozenTrial:
    """The trial `best` picks: `trial` itself, else the best under the budget (404 when none has a spec)."""
    study = _study(runtime, search)
    if trial is not None and not any(t.number == trial for t in study.get_trials(deepcopy=False)):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"the search has no trial {trial}")
    chosen = results.best_so_far(study, latency_budget_ms=latency_budget_ms, trial_number=trial)
    if chosen is None:
        what = (
            f"trial {trial} is not a complete trial with a spec"
            if trial is not None
            else (
                f"no complete trial within {latency_budget_ms} ms"
                if latency_budget_ms
                else "no complete trial yet"
            )
        )
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=what)
    if not isinstance(chosen.user_attrs.get("spec"), dict):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"trial {chosen.number} has no spec")
    return chosen


BudgetQuery = Annotated[
    float | None, Query(gt=0, le=1e7, description="pick the best trial under this latency")
]
TrialQuery = Annotated[int | None, Query(ge=0, le=10_000_000, description="pick this trial number")]
ToleranceQuery = Annotated[
    float,
    Query(ge=0, lt=1, description="validation-accuracy differences within this count as noise (one seed)"),
]


@dataclass(frozen=True)
class Choice:
    """A search of the caller's and the trial `best` picks in it."""

    search: Search
    trial: FrozenTrial


def choose_best(
    search_id: SearchId,
    session: SessionDep,
    user: CurrentUser,
    runtime: RuntimeDep,
    latency_budget_ms: BudgetQuery = None,
    trial: TrialQuery = None,
) -> Choice:
    """The parameters of `best` and its downloads, resolved: 404 for a search not the caller's
    or no trial to pick."""
    search = find_search(session, search_id, user)
    return Choice(search, best_trial(runtime, search, latency_budget_ms, trial))


BestChoice = Annotated[Choice, Depends(choose_best)]


@router.get("/{search_id}/best", response_model=BestPublic, responses=NOT_FOUND_RESPONSE)
def read_best(
    choice: BestChoice,
    runtime: RuntimeDep,
    latency_budget_ms: BudgetQuery = None,
    trial: TrialQuery = None,
    accuracy_tolerance: ToleranceQuery = ACCURACY_TOLERANCE,
) -> BestPublic:
    """The chosen architecture: its ArchSpec JSON, metrics (with the finalists' re-measured latency),
    where to download it, and `tie`: the candidates within the noise of it and the rule that picked it."""
    search, chosen = choice.search, choice.trial
    study = _study(runtime, search)
    decision = results.best_decision(
        study, latency_budget_ms=latency_budget_ms, trial_number=trial, accuracy_tolerance=accuracy_tolerance
    )
    tie = None
    if decision is not None and decision.chosen.number == chosen.number:
        tie = TiePublic.model_validate(decision.to_dict())
    base = f"/api/v1/searches/{search.id}/best"
    query = f"?trial={chosen.number}"
    return BestPublic(
        trial=chosen.number,
        spec=chosen.user_attrs["spec"],
        metrics={
            **results.trial_metrics(chosen, settings=runtime.settings),
            **results.remeasured_metrics(chosen, remeasurement(study)),  # type: ignore[arg-type]
        },
        values=results._finite(chosen.values),
        links={"weights": f"{base}/weights{query}", "onnx": f"{base}/onnx{query}"},
        tie=tie,
    )


@router.post(
    "/{search_id}/priority",
    response_model=SearchPublic,
    responses={
        **NOT_FOUND_RESPONSE,
        400: {"model": Message, "description": "the body is not JSON (e.g. not UTF-8)"},
        403: {"model": Message, "description": "only an admin sets priorities"},
        413: {"model": Message, "description": "the body is over the server's size limit"},
        422: {"model": ValidationErrorPublic, "description": "the priority is not an integer in range"},
    },
)
def set_priority(
    request: Request,
    search_id: SearchId,
    body: PriorityUpdate,
    session: SessionDep,
    user: CurrentUser,
    runtime: RuntimeDep,
) -> SearchPublic:
    """An admin's priority for a search: a queued search of higher priority is started first."""
    if not user.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="only an admin may set a search's priority")
    search = find_search(session, search_id, user)
    crud.set_priority(session, search=search, priority=body.priority)
    session.commit()
    log.info("search %s: priority %d set by %s", search.id, body.priority, user.name)
    return _public(request, search, runtime, with_progress=False)
