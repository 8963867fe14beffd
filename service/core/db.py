"""The database: engine (SQLite in WAL mode, or PostgreSQL), sessions, and Alembic migrations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from search_spaces.storage import configure_engine, database_url, engine_options, prepare_database

SERVICE_DIR = Path(__file__).resolve().parents[1]  # service/: alembic.ini and migrations/ live there


class DatabaseError(RuntimeError):
    """The database cannot be reached or migrated; the message says which URL and why."""


def make_engine(url: str) -> Engine:
    """An engine for the service's tables at `url`, with the settings every engine of spsa-nas has
    (search_spaces.storage): SQLite in WAL mode with its directory created, the one busy timeout
    and foreign keys on; PostgreSQL with the pool settings."""
    try:
        parsed = database_url(url)
        prepare_database(parsed)
    except ValueError as exc:
        raise DatabaseError(f"invalid database URL {url!r}: {exc}") from None
    engine = create_engine(parsed, **engine_options(parsed))
    configure_engine(engine)
    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config() -> Config:
    config = Config(str(SERVICE_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(SERVICE_DIR / "migrations"))
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the service's tables to `revision` (Alembic `upgrade`); data is kept."""
    config = alembic_config()
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except Exception as exc:
        url = engine.url.render_as_string(hide_password=True)
        raise DatabaseError(f"cannot migrate the database {url}: {exc}") from exc
