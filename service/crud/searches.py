"""Searches as rows: create, read the ones a user may see, count, request cancellation."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload

from service.core.models import ACTIVE_STATES, QUEUED, Search, User, utcnow


def create_search(
    session: Session, *, search_id: str, owner: User, name: str | None, study_name: str
) -> Search:
    """A queued search of the study `study_name`, which holds its config (create_study)."""
    search = Search(
        id=search_id,
        owner_id=owner.id,
        name=name,
        study_name=study_name,
        status=QUEUED,
        created_at=utcnow(),
        attempts=0,
    )
    session.add(search)
    session.flush()
    return search


def get_search(session: Session, *, search_id: str, user: User) -> Search | None:
    """The search if it exists and `user` may see it (its owner, or an admin); else None."""
    search = session.get(Search, search_id, options=[joinedload(Search.owner)])
    if search is None or (search.owner_id != user.id and not user.is_admin):
        return None
    return search


def list_searches(
    session: Session, *, user: User, skip: int, limit: int, status: str | None = None
) -> tuple[list[Search], int]:
    """The searches `user` may see, newest first, and how many there are in all."""
    where = [] if user.is_admin else [Search.owner_id == user.id]
    if status:
        where.append(Search.status == status)
    count = session.scalar(select(func.count()).select_from(Search).where(*where)) or 0
    rows = session.scalars(
        select(Search)
        .options(joinedload(Search.owner))
        .where(*where)
        .order_by(Search.created_at.desc(), Search.id)
        .offset(skip)
        .limit(limit)
    )
    return list(rows), int(count)


def count_searches(session: Session, *, owner_id: int, states: Iterable[str] = ACTIVE_STATES) -> int:
    """How many of `owner_id`'s searches are in one of `states` (default: queued or running)."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Search)
            .where(Search.owner_id == owner_id, Search.status.in_(tuple(states)))
        )
        or 0
    )


def owned_study_names(session: Session, *, user: User) -> set[str]:
    """Study names of the searches `user` owns (the dashboard's view of them)."""
    return set(session.scalars(select(Search.study_name).where(Search.owner_id == user.id)))


def set_priority(session: Session, *, search: Search, priority: int) -> None:
    """The search's priority: among claimable searches, a higher one is claimed first."""
    search.priority = priority
    session.flush()
