"""On-demand re-measurements of a finished search's finalists: the API's request (one pending per search),
a coordinator's fenced claim on it (lease on the database's clock), its renewal, release and end."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from service.core.models import FINAL_STATES, Search
from service.crud.claims import claim_first, db_now

RemeasureState = Literal["none", "pending", "running", "done", "failed"]


def request_remeasure(session: Session, *, search_id: str) -> bool:
    """Record a request to re-measure a finished search's finalists; False when one is pending
    already or the search is not finished (one conditional UPDATE: of two racing requests, one
    wins). Commits."""
    result = session.execute(
        update(Search)
        .where(
            Search.id == search_id,
            Search.status.in_(FINAL_STATES),
            Search.remeasure_requested_at.is_(None),
        )
        .values(remeasure_requested_at=db_now())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def count_pending_remeasures(session: Session, *, owner_id: int) -> int:
    """The owner's re-measurements asked for and not finished (pending or running)."""
    return int(
        session.scalar(
            select(func.count(Search.id)).where(
                Search.owner_id == owner_id, Search.remeasure_requested_at.is_not(None)
            )
        )
        or 0
    )


def _claimable() -> ColumnElement[bool]:
    return and_(
        Search.remeasure_requested_at.is_not(None),
        or_(Search.remeasure_owner.is_(None), Search.remeasure_expires_at.is_(None),
            Search.remeasure_expires_at < db_now()),
    )


def claim_remeasure(session: Session, *, owner: str, lease_s: float) -> Search | None:
    """Atomically take the oldest pending re-measurement (or one whose holder's lease ran out); the
    claim lasts `lease_s` unless renewed. None when there is none."""
    candidates = session.scalars(
        select(Search.id).where(_claimable()).order_by(Search.remeasure_requested_at).limit(8)
    ).all()
    return claim_first(session, candidates, [_claimable()], {
        "remeasure_owner": owner, "remeasure_expires_at": db_now(lease_s), "remeasure_started_at": db_now(),
    })


def _held(search_id: str, owner: str) -> list[ColumnElement[bool]]:
    return [
        Search.id == search_id,
        Search.remeasure_owner == owner,
        Search.remeasure_requested_at.is_not(None),
    ]


def renew_remeasure(session: Session, *, search_id: str, owner: str, lease_s: float) -> bool:
    """Extend our claim on a re-measurement; False when it is not ours any more."""
    result = session.execute(
        update(Search)
        .where(*_held(search_id, owner))
        .values(remeasure_expires_at=db_now(lease_s))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def finish_remeasure(session: Session, *, search_id: str, owner: str, error: str | None = None) -> bool:
    """Record the end of a re-measurement we hold: the request is cleared (a new one may be made),
    when it finished and its error (None: it succeeded) are kept. False when it was not ours."""
    result = session.execute(
        update(Search)
        .where(*_held(search_id, owner))
        .values(
            remeasure_requested_at=None,
            remeasure_owner=None,
            remeasure_expires_at=None,
            remeasure_finished_at=db_now(),
            remeasure_error=error,
            remeasure_count=Search.remeasure_count + 1,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def release_remeasure(session: Session, *, search_id: str, owner: str) -> bool:
    """Give a re-measurement back unfinished (coordinator shutting down): it stays pending and the
    next coordinator takes it at once."""
    result = session.execute(
        update(Search)
        .where(*_held(search_id, owner))
        .values(remeasure_owner=None, remeasure_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def remeasure_status(search: Search) -> dict[str, Any]:
    """What a search's answer says of its on-demand re-measurement: `state` (none: never asked;
    pending: asked, no coordinator has taken it yet; running; done; failed: the last one's error),
    and its times."""
    state: RemeasureState = "none"
    if search.remeasure_requested_at is not None:
        state = "running" if search.remeasure_owner is not None else "pending"
    elif search.remeasure_finished_at is not None:
        state = "failed" if search.remeasure_error else "done"
    return {
        "state": state,
        "requested_at": search.remeasure_requested_at,
        "started_at": search.remeasure_started_at,
        "finished_at": search.remeasure_finished_at,
        "error": search.remeasure_error,
        "count": search.remeasure_count or 0,
    }
