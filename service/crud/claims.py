"""The dispatcher's claims on searches: compare-and-set leases, renewed, released, finished."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from service.core.models import CANCELLING, QUEUED, RUNNING, Search, utcnow


def _claimable(now: datetime) -> object:
    expired = and_(
        Search.status.in_((RUNNING, CANCELLING)),
        or_(Search.lease_expires_at.is_(None), Search.lease_expires_at < now),
    )
    return or_(Search.status == QUEUED, expired)


def claim_next_search(session: Session, *, owner: str, lease_s: float) -> Search | None:
    """Atomically take the oldest queued search, or a running one whose lease has expired.

    Compare-and-set on the row: of two dispatchers (threads or servers) racing for a search,
    exactly one wins. A resumed search keeps its status and started_at.
    """
    now = utcnow()
    candidates = session.scalars(
        select(Search.id).where(_claimable(now)).order_by(Search.created_at).limit(8)
    ).all()
    for search_id in candidates:
        result = session.execute(
            update(Search)
            .where(Search.id == search_id, _claimable(now))
            .values(
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_s),
                attempts=Search.attempts + 1,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            search = session.get(Search, search_id, populate_existing=True)
            if search is None:
                continue
            if search.status == QUEUED:
                search.status = RUNNING
                search.started_at = now
            session.commit()
            return search
    session.commit()
    return None


def renew_lease(session: Session, *, search_id: str, owner: str, lease_s: float) -> str | None:
    """Extend our claim; returns the search's status, or None when the claim was lost."""
    now = utcnow()
    result = session.execute(
        update(Search)
        .where(Search.id == search_id, Search.lease_owner == owner)
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return session.scalar(select(Search.status).where(Search.id == search_id))


def claimed_status(session: Session, *, search_id: str, owner: str) -> str | None:
    """The status of a search `owner` holds (a read: the lease is left as it is); None when the
    claim was lost. How a dispatcher learns of a cancel between two renewals."""
    return session.scalar(select(Search.status).where(Search.id == search_id, Search.lease_owner == owner))


def finish_search(
    session: Session,
    *,
    search_id: str,
    owner: str,
    status: str,
    error: str | None = None,
    result_json: str | None = None,
) -> bool:
    """Record the end of a search we hold; False when another dispatcher holds it now."""
    result = session.execute(
        update(Search)
        .where(Search.id == search_id, Search.lease_owner == owner)
        .values(
            status=status,
            error=error,
            result=result_json,
            finished_at=utcnow(),
            lease_owner=None,
            lease_expires_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def release_search(session: Session, *, search_id: str, owner: str) -> None:
    """Give a search back (server shutting down): another dispatcher may take it at once."""
    session.execute(
        update(Search)
        .where(Search.id == search_id, Search.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
