"""Alembic environment: migrates the service's tables in the database given by the caller or env."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from service.core.models import Base

# Optuna's RDB storage keeps its own Alembic version in `alembic_version` in the same database.
VERSION_TABLE = "spsa_nas_alembic_version"


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:  # service.core.db.migrate passes its own connection
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url") or os.environ.get("SPSA_NAS_DATABASE_URL")
    if not url:
        raise SystemExit("set SPSA_NAS_DATABASE_URL (or sqlalchemy.url) to the database to migrate")
    engine = create_engine(url)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run them against a database")
run_migrations_online()
