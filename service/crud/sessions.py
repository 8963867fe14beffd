"""Dashboard sessions: a token traded for an opaque, expiring, server-side session id."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.core.models import Token, User, WebSession, utcnow
from service.core.security import hash_token, new_session_id, same_hash
from service.crud.users import live_token


def open_web_session(
    session: Session, *, token: str, ttl_s: float, max_per_user: int
) -> tuple[str, User] | None:
    """Trade a live API token for a new session id (returned in clear once; only its hash is
    stored), valid `ttl_s` seconds; None when the token is not valid. A user keeps at most
    `max_per_user` sessions: the oldest beyond that are ended."""
    found = live_token(session, token)
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
