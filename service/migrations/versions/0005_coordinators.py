"""The coordinators that run searches, with the cluster resources each last saw (for the API's checks)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "coordinators",
        sa.Column("owner", sa.String(64), primary_key=True),
        sa.Column("resources", sa.Text, nullable=False),
        sa.Column("seen_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_coordinators_seen_at", "coordinators", ["seen_at"])


def downgrade() -> None:
    op.drop_table("coordinators")
