"""The dispatcher's claims on searches: fenced compare-and-set leases on the database's clock, served
fairly, renewed, released, finished; and the conditional cancel that races them safely.

Every state change is one `UPDATE ... WHERE status IN (...)` whose row count is checked, so two
writers racing for a row (two claimers, a claim and a cancel, a finish and a cancel) never both
win. Lease times come from the database's clock (`db_now`), never a process's, so coordinators on
hosts whose clocks differ agree on when a lease ran out. Each claim increments the row's
`lease_token` (a fencing token): renew, finish and release given the token succeed only while it
is unchanged, so a coordinator that stalled past its lease cannot write after another took over,
even one with the same owner name.

Cancel versus finish (the rule): a cancel committed before the finish wins — a search in
`cancelling` ends `cancelled` whatever outcome its holder reports (the error and report are kept);
a cancel that comes after the finish finds a final search and changes nothing. Cancel versus
claim: a queued search cancelled first is never claimed; one claimed first becomes `cancelling`
and its holder ends it `cancelled`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import DateTime, and_, case, func, literal, or_, select, true, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from service.core.models import (
    CANCELLED,
    CANCELLING,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    Search,
)

HELD_STATES = (RUNNING, CANCELLING)  # a coordinator holds (or held) the search


class db_now(FunctionElement[Any]):  # noqa: N801 - an SQL function, named like one
    """The database's clock plus `seconds`, as naive UTC (what every timestamp column holds).

    PostgreSQL: `now() AT TIME ZONE 'UTC'` (the transaction's start). SQLite: `strftime` of 'now'
    in the text format SQLAlchemy writes (microseconds; SQLite's clock has milliseconds), so text
    comparisons with stored values order correctly."""

    type = DateTime()
    inherit_cache = True

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__(literal(float(seconds)))


@compiles(db_now, "postgresql")
def _db_now_postgresql(element: db_now, compiler: Any, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"((now() AT TIME ZONE 'UTC') + make_interval(secs => CAST({seconds} AS double precision)))"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', ({seconds}) || ' seconds') || '000')"


@compiles(db_now)
def _db_now_default(element: db_now, compiler: Any, **kw: Any) -> str:
    raise NotImplementedError(f"db_now: no clock expression for {compiler.dialect.name}")


def _claimable() -> ColumnElement[bool]:
    expired = and_(
        Search.status.in_(HELD_STATES),
        or_(Search.lease_expires_at.is_(None), Search.lease_expires_at < db_now()),
    )
    return or_(Search.status == QUEUED, expired)


def _fair_order() -> tuple[ColumnElement[Any], ...]:
    """The order searches are served in: orphans first (running, their lease expired: admitted
    already and part-done), then higher priority, then the owner with the fewest searches running,
    then the owner served least recently (round-robin: one user's queue does not delay another's
    first search), then the oldest."""
    other = aliased(Search)
    owner_running = (
        select(func.count(other.id))
        .where(other.owner_id == Search.owner_id, other.status.in_(HELD_STATES))
        .scalar_subquery()
    )
    owner_last_start = (
        select(func.max(other.started_at)).where(other.owner_id == Search.owner_id).scalar_subquery()
    )
    return (
        case((Search.status == QUEUED, 1), else_=0),
        Search.priority.desc(),
        owner_running,
        owner_last_start.asc().nulls_first(),
        Search.created_at,
    )


def _under_running_cap(cap: int | None) -> ColumnElement[bool]:
    """A queued search may start only while its owner runs fewer than `cap` searches (None: no cap);
    a held search whose lease expired is a resumption, not a new run, and is always claimable."""
    if cap is None:
        return true()
    busy_owners = (
        select(Search.owner_id)
        .where(Search.status.in_(HELD_STATES))
        .group_by(Search.owner_id)
        .having(func.count() >= cap)
    )
    return or_(Search.status != QUEUED, Search.owner_id.not_in(busy_owners.scalar_subquery()))


def claim_next_search(
    session: Session, *, owner: str, lease_s: float, max_running_per_user: int | None = None
) -> Search | None:
    """Atomically take the next search in fair order (`_fair_order`): a queued one, or a held one
    whose lease has expired. The returned row's `lease_token` is the claim's fencing token: pass it
    to renew_lease, claimed_status, finish_search and release_search.

    One conditional UPDATE per candidate: of two dispatchers (threads or servers) racing for a
    search, exactly one wins; a search cancelled meanwhile is not taken. A resumed search keeps its
    status and started_at.
    """
    capped = _under_running_cap(max_running_per_user)
    next_ids = select(Search.id).where(_claimable(), capped).order_by(*_fair_order()).limit(8)
    return claim_first(session, session.scalars(next_ids).all(), [_claimable(), capped], {
        "lease_owner": owner,
        "lease_expires_at": db_now(lease_s),
        "lease_token": Search.lease_token + 1,
        "attempts": Search.attempts + 1,
        "status": case((Search.status == QUEUED, RUNNING), else_=Search.status),
        "started_at": case((Search.status == QUEUED, db_now()), else_=Search.started_at),
    })


def claim_first(session: Session, candidates: Sequence[str], where: list[ColumnElement[bool]],
                values: dict[str, Any]) -> Search | None:
    """Take the first of `candidates` (search ids) that still matches `where`, by one conditional
    UPDATE setting `values` per candidate: a row another process took meanwhile is skipped. Commits;
    the taken row, refreshed, or None when none could be taken."""
    for search_id in candidates:
        result = session.execute(
            update(Search).where(Search.id == search_id, *where).values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            session.commit()
            search = session.get(Search, search_id, populate_existing=True)
            if search is not None:
                return search
    session.commit()
    return None


def _held(search_id: str, owner: str, token: int | None) -> list[ColumnElement[bool]]:
    """The row `owner` holds under fencing token `token` (any token when None: the owner alone)."""
    conditions = [Search.id == search_id, Search.lease_owner == owner, Search.status.in_(HELD_STATES)]
    if token is not None:
        conditions.append(Search.lease_token == token)
    return conditions


def renew_lease(
    session: Session, *, search_id: str, owner: str, lease_s: float, token: int | None = None
) -> str | None:
    """Extend our claim; returns the search's status, or None when the claim was lost (another
    holds it now, or the token is not the current one, or the search is over)."""
    result = session.execute(
        update(Search)
        .where(*_held(search_id, owner, token))
        .values(lease_expires_at=db_now(lease_s))
        .execution_options(synchronize_session=False)
    )
    renewed = result.rowcount == 1  # type: ignore[attr-defined]
    status = session.scalar(select(Search.status).where(Search.id == search_id)) if renewed else None
    session.commit()
    return status


def claimed_status(session: Session, *, search_id: str, owner: str, token: int | None = None) -> str | None:
    """The status of a search `owner` holds (a read: the lease is left as it is); None when the
    claim was lost. How a dispatcher learns of a cancel between two renewals."""
    return session.scalar(select(Search.status).where(*_held(search_id, owner, token)))


def finish_search(
    session: Session,
    *,
    search_id: str,
    owner: str,
    status: str,
    error: str | None = None,
    result_json: str | None = None,
    token: int | None = None,
) -> bool:
    """Record the end of a search we hold; False when another dispatcher holds it now (or the
    token is stale, or it is over already). A search whose cancel was asked (`cancelling`) ends
    `cancelled` whatever `status` says: the user's request wins (the module's rule)."""
    if status not in FINAL_STATES:
        raise ValueError(f"finish_search: status must be one of {', '.join(FINAL_STATES)}, not {status!r}")
    result = session.execute(
        update(Search)
        .where(*_held(search_id, owner, token))
        .values(
            status=case((Search.status == CANCELLING, CANCELLED), else_=status),
            error=error,
            result=result_json,
            finished_at=db_now(),
            lease_owner=None,
            lease_expires_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def release_search(session: Session, *, search_id: str, owner: str, token: int | None = None) -> bool:
    """Give a search back (server shutting down): another dispatcher may take it at once. False
    when it was not ours (any more) to give."""
    result = session.execute(
        update(Search)
        .where(*_held(search_id, owner, token))
        .values(lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def cancel_search_row(session: Session, *, search_id: str) -> str | None:
    """Ask to cancel, conditionally: queued -> cancelled at once, running -> cancelling (its holder
    ends it); a final search is left as it is. Returns the status after (None: no such search).

    Each step is an UPDATE guarded by the status it expects, so a claim or a finish racing this
    call cannot be overwritten: if a claim wins, the queued step matches nothing and the running
    step marks it cancelling. Commits."""
    queued = session.execute(
        update(Search)
        .where(Search.id == search_id, Search.status == QUEUED)
        .values(status=CANCELLED, finished_at=db_now(), lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    if queued.rowcount != 1:  # type: ignore[attr-defined]
        session.execute(
            update(Search)
            .where(Search.id == search_id, Search.status == RUNNING)
            .values(status=CANCELLING)
            .execution_options(synchronize_session=False)
        )
    status = session.scalar(select(Search.status).where(Search.id == search_id))
    session.commit()
    return status
