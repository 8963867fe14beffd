"""Users and their API tokens: create, issue, revoke, list, authenticate."""

from __future__ import annotations

import re

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.core.models import Token, User, WebSession, utcnow
from service.core.security import hash_token, new_token, same_hash

USER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class UserError(ValueError):
    """A user command that cannot be done (bad name, exists, unknown); the message says why."""


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


def live_token(session: Session, token: str) -> tuple[Token, User] | None:
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
    found = live_token(session, token)
    return None if found is None else found[1]
