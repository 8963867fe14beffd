"""On-demand re-measurement of a finished search's finalists: the request (pending while set), the
coordinator's claim on it (owner, lease), when it last finished and why it failed."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

COLUMNS = (
    "remeasure_requested_at",
    "remeasure_owner",
    "remeasure_expires_at",
    "remeasure_started_at",
    "remeasure_finished_at",
    "remeasure_error",
    "remeasure_count",
)


def upgrade() -> None:
    with op.batch_alter_table("searches") as batch:
        batch.add_column(sa.Column("remeasure_requested_at", sa.DateTime, nullable=True))
        batch.add_column(sa.Column("remeasure_owner", sa.String(64), nullable=True))
        batch.add_column(sa.Column("remeasure_expires_at", sa.DateTime, nullable=True))
        batch.add_column(sa.Column("remeasure_started_at", sa.DateTime, nullable=True))
        batch.add_column(sa.Column("remeasure_finished_at", sa.DateTime, nullable=True))
        batch.add_column(sa.Column("remeasure_error", sa.Text, nullable=True))
        batch.add_column(sa.Column("remeasure_count", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_searches_remeasure_requested_at", "searches", ["remeasure_requested_at"])


def downgrade() -> None:
    op.drop_index("ix_searches_remeasure_requested_at", table_name="searches")
    with op.batch_alter_table("searches") as batch:
        for column in reversed(COLUMNS):
            batch.drop_column(column)
