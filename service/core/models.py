"""The service's tables (users, tokens, searches) as SQLAlchemy models; Optuna's live beside them."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Search states. queued -> running -> completed | failed; cancel: queued -> cancelled,
# running -> cancelling -> cancelled.
QUEUED, RUNNING, CANCELLING = "queued", "running", "cancelling"
COMPLETED, FAILED, CANCELLED = "completed", "failed", "cancelled"
ACTIVE_STATES = (QUEUED, RUNNING, CANCELLING)
FINAL_STATES = (COMPLETED, FAILED, CANCELLED)


def utcnow() -> datetime:
    """Naive UTC now: what every timestamp column holds (SQLite keeps no time zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    tokens: Mapped[list[Token]] = relationship(back_populates="user")


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the token
    prefix: Mapped[str] = mapped_column(String(12))  # first characters, to tell tokens apart
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    user: Mapped[User] = relationship(back_populates="tokens")


class Search(Base):
    __tablename__ = "searches"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # uuid4
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the client's label
    study_name: Mapped[str] = mapped_column(String(128), unique=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=QUEUED)
    # The search's config lives with its study (user attr spsa_nas:config), read by the workers,
    # the CLI, the dashboard and the API alike: stored once (migration 0003 dropped it here).
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)  # the run's RunReport (JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # Dispatcher claim: which server process runs it, until when (renewed while it runs).
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # times a dispatcher started it
    # Fencing token: incremented at every claim; renew/finish/release succeed only with the current
    # one, so a coordinator whose lease was taken over cannot write any more.
    lease_token: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Served first when higher (an admin raises it); ties are served round-robin across owners.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # On-demand re-measurement of a finished search's finalists (POST .../remeasure; migration 0006):
    # pending while `remeasure_requested_at` is set; a coordinator claims it (owner, lease on the
    # database's clock), runs it, then clears the request and records when it finished (and why
    # it failed). `remeasure_count`: re-measurements finished on demand.
    remeasure_requested_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    remeasure_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    remeasure_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    remeasure_started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    remeasure_finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    remeasure_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    remeasure_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    owner: Mapped[User] = relationship()


class WebSession(Base):
    """A browser's dashboard session: the cookie holds a random id, the table its sha256 only.

    It lives while the token that opened it lives, its user is active and `expires_at` is ahead;
    logging out deletes the row, revoking the user deletes all of theirs."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("tokens.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)

    user: Mapped[User] = relationship()


class Coordinator(Base):
    """A coordinator process (its dispatcher's claim owner) and the Ray cluster's total resources
    it last saw ({"CPU": 16, "GPU": 2, "memory": bytes, ...}); the API checks submissions against
    the freshest one without importing Ray."""

    __tablename__ = "coordinators"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    resources: Mapped[str] = mapped_column(Text)  # JSON
    seen_at: Mapped[datetime] = mapped_column(DateTime, index=True)
