"""Create/read/update of users, tokens and searches: keyword-only functions over a Session."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session, joinedload

from service.models import (
    ACTIVE_STATES,
    CANCELLED,
    CANCELLING,
    QUEUED,
    RUNNING,
    Search,
    Token,
    User,
    WebSession,
    utcnow,
)
from service.security import hash_token, new_session_id, new_token, same_hash

USER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class UserError(ValueError):
    """A user command that cannot be done (bad name, exists, unknown); the message says why."""


# ---- users and tokens -------------------------------------------------------------------------


def get_user_by_name(session: Session, *, name: str) -> User | None:
    return session.scalar(select(User).where(User.name == name))


def create_user(session: Session, *, name: str, is_admin: bool = False) -> tuple[User, str]:
    """A new user and its first token (returned in clear once)."""
    if not USER_NAME_RE.match(name):
        raise UserError(
            f"invalid user name {name!r}: 1-64 letters, digits and _ . @ -, starting with a letter or digit"
        )
    if get_user_by_name(session, name=name) is not None:
        raise UserError(f"user {name!r} exists; `spsa-nas users token {name}` issues a new token")
    user = User(name=name, is_admin=is_admin, is_active=True, created_at=utcnow())
    session.add(user)
    session.flush()
    return user, issue_token(session, user=user)


def issue_token(session: Session, *, user: User) -> str:
    """A new token for `user` (re-activating a revoked user)."""
    token = new_token()
    user.is_active = True
    session.add(Token(user_id=user.id, token_hash=hash_token(token), prefix=token[:12], created_at=utcnow()))
    session.flush()
    return token


def revoke_user(session: Session, *, name: str) -> int:
    """Deactivate `name` and revoke all its tokens; returns how many tokens were revoked."""
    user = get_user_by_name(session, name=name)
    if user is None:
        raise UserError(f"no user named {name!r}")
    user.is_active = False
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    result = session.execute(
        update(Token).where(Token.user_id == user.id, Token.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def list_users(session: Session) -> list[tuple[User, int]]:
    """Every user with its number of live tokens."""
    live = (
        select(Token.user_id, func.count().label("n"))
        .where(Token.revoked_at.is_(None))
        .group_by(Token.user_id)
        .subquery()
    )
    rows = session.execute(
        select(User, func.coalesce(live.c.n, 0)).outerjoin(live, live.c.user_id == User.id).order_by(User.id)
    )
    return [(user, int(n)) for user, n in rows]


def _live_token(session: Session, token: str) -> tuple[Token, User] | None:
    if not token or len(token) > 256:
        return None
    digest = hash_token(token)
    row = session.execute(
        select(Token, User)
        .join(User, User.id == Token.user_id)
        .where(Token.token_hash == digest, Token.revoked_at.is_(None), User.is_active.is_(True))
    ).first()
    if row is None or not same_hash(row[0].token_hash, digest):
        return None
    return row[0], row[1]


def authenticate(session: Session, *, token: str) -> User | None:
    """The active user owning the live `token`, or None."""
    found = _live_token(session, token)
    return None if found is None else found[1]


# ---- dashboard sessions -----------------------------------------------------------------------


def open_web_session(
    session: Session, *, token: str, ttl_s: float, max_per_user: int
) -> tuple[str, User] | None:
    """Trade a live API token for a new session id (returned in clear once; only its hash is
    stored), valid `ttl_s` seconds; None when the token is not valid. A user keeps at most
    `max_per_user` sessions: the oldest beyond that are ended."""
    found = _live_token(session, token)
    if found is None:
        return None
    token_row, user = found
    now = utcnow()
    session.execute(delete(WebSession).where(WebSession.expires_at <= now))
    session_id = new_session_id()
    session.add(
        WebSession(
            session_hash=hash_token(session_id),
            user_id=user.id,
            token_id=token_row.id,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
        )
    )
    session.flush()
    keep = select(WebSession.id).where(WebSession.user_id == user.id)
    keep = keep.order_by(WebSession.created_at.desc(), WebSession.id.desc()).limit(max_per_user)
    session.execute(
        delete(WebSession).where(WebSession.user_id == user.id, WebSession.id.not_in(keep.scalar_subquery()))
    )
    return session_id, user


def session_user(session: Session, *, session_id: str) -> User | None:
    """The user of a live session: not expired, logged in with a token that is still live, by a
    user who is still active. None otherwise."""
    if not session_id or len(session_id) > 256:
        return None
    digest = hash_token(session_id)
    row = session.execute(
        select(WebSession, User)
        .join(User, User.id == WebSession.user_id)
        .join(Token, Token.id == WebSession.token_id)
        .where(
            WebSession.session_hash == digest,
            WebSession.expires_at > utcnow(),
            Token.revoked_at.is_(None),
            User.is_active.is_(True),
        )
    ).first()
    if row is None or not same_hash(row[0].session_hash, digest):
        return None
    return row[1]


def end_web_session(session: Session, *, session_id: str) -> bool:
    """Log out: the session is gone on the server; True when there was one."""
    if not session_id or len(session_id) > 256:
        return False
    result = session.execute(delete(WebSession).where(WebSession.session_hash == hash_token(session_id)))
    return bool(result.rowcount)  # type: ignore[attr-defined]


# ---- searches ---------------------------------------------------------------------------------


def create_search(
    session: Session, *, search_id: str, owner: User, name: str | None, study_name: str, config_json: str
) -> Search:
    search = Search(
        id=search_id,
        owner_id=owner.id,
        name=name,
        study_name=study_name,
        status=QUEUED,
        config=config_json,
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


def count_active_searches(session: Session, *, owner_id: int) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Search)
            .where(Search.owner_id == owner_id, Search.status.in_(ACTIVE_STATES))
        )
        or 0
    )


def owned_study_names(session: Session, *, user: User) -> set[str]:
    """Study names of the searches `user` owns (the dashboard's view of them)."""
    return set(session.scalars(select(Search.study_name).where(Search.owner_id == user.id)))


def request_cancel(session: Session, *, search: Search) -> None:
    """queued -> cancelled at once; running -> cancelling (the dispatcher finishes it)."""
    if search.status == QUEUED:
        search.status = CANCELLED
        search.finished_at = utcnow()
    elif search.status == RUNNING:
        search.status = CANCELLING
    session.flush()


# ---- the dispatcher's claims ------------------------------------------------------------------


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
