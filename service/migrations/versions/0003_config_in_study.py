"""A search's config is stored once, with its Optuna study (user attr spsa_nas:config): the searches
row's copy goes."""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Frozen here (a migration must not change when the code does): search_spaces.keys.CONFIG_ATTR.
CONFIG_ATTR = "spsa_nas:config"


def _study_ids(bind: sa.engine.Connection) -> dict[str, int]:
    """Study name -> id of Optuna's studies in this database ({} when Optuna has no tables yet)."""
    if "studies" not in sa.inspect(bind).get_table_names():
        return {}
    rows = bind.execute(sa.text("SELECT study_id, study_name FROM studies"))
    return {name: study_id for study_id, name in rows}


def _stored_config(bind: sa.engine.Connection, study_id: int) -> str | None:
    value = bind.execute(
        sa.text("SELECT value_json FROM study_user_attributes WHERE study_id = :id AND key = :key"),
        {"id": study_id, "key": CONFIG_ATTR},
    ).scalar()
    return None if value is None else json.loads(value)  # Optuna stores json.dumps(the JSON string)


def upgrade() -> None:
    bind = op.get_bind()
    studies = _study_ids(bind)
    # The API creates the study with its config before the row, so every study has it; should one
    # lack it (an older writer), it gets the row's copy before the row's is dropped.
    for study_name, config in bind.execute(sa.text("SELECT study_name, config FROM searches")).all():
        study_id = studies.get(study_name)
        if study_id is not None and _stored_config(bind, study_id) is None:
            bind.execute(
                sa.text("INSERT INTO study_user_attributes (study_id, key, value_json) "
                        "VALUES (:id, :key, :value)"),
                {"id": study_id, "key": CONFIG_ATTR, "value": json.dumps(config)},
            )
    with op.batch_alter_table("searches") as batch:
        batch.drop_column("config")


def downgrade() -> None:
    with op.batch_alter_table("searches") as batch:
        batch.add_column(sa.Column("config", sa.Text, nullable=False, server_default="{}"))
    bind = op.get_bind()
    studies = _study_ids(bind)
    for search_id, study_name in bind.execute(sa.text("SELECT id, study_name FROM searches")).all():
        study_id = studies.get(study_name)
        config = None if study_id is None else _stored_config(bind, study_id)
        if config is not None:
            bind.execute(sa.text("UPDATE searches SET config = :config WHERE id = :id"),
                         {"config": config, "id": search_id})
