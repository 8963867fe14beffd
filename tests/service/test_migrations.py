"""Migration 0003: a search's config moves from its row to its study (where it already is), and back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from alembic import command
from sqlalchemy import inspect, text

from search_spaces.config import SearchConfig
from search_spaces.keys import CONFIG_ATTR
from search_spaces.storage import open_storage
from search_spaces.study import create_study, study_config
from service.core.db import alembic_config, make_engine, migrate
from tests.service.conftest import own_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of this test only (it is migrated down and up)."""
    yield from own_database(request, tmp_path, "spsa_migrations")


def _search_row(conn, search_id: str, study_name: str, config: str) -> None:  # type: ignore[no-untyped-def]
    conn.execute(text("INSERT INTO searches (id, owner_id, study_name, status, config, created_at, attempts) "
                      "VALUES (:id, 1, :study, 'queued', :config, '2026-01-01', 0)"),
                 {"id": search_id, "study": study_name, "config": config})


def test_config_moves_to_the_study_and_back(url: str) -> None:
    engine = make_engine(url)
    migrate(engine, "0002")
    storage = open_storage(url)
    with_config = SearchConfig(study_name="with", trials=5)
    create_study(with_config, storage)  # what the API did: the study has the config already
    without = SearchConfig(study_name="without", trials=7)
    optuna.create_study(study_name="without", storage=storage)  # a study that lacks it
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, name, is_admin, is_active, created_at) "
                          "VALUES (1, 'alice', false, true, '2026-01-01')"))
        _search_row(conn, "a", "with", with_config.model_dump_json())
        _search_row(conn, "b", "without", without.model_dump_json())

    migrate(engine)  # to head (0003 moved the config; later ones add columns)
    assert "config" not in {c["name"] for c in inspect(engine).get_columns("searches")}
    assert study_config(optuna.load_study(study_name="with", storage=storage)) == with_config
    assert study_config(optuna.load_study(study_name="without", storage=storage)) == without

    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0002")
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT id, config FROM searches")).all())
    assert SearchConfig.model_validate(json.loads(rows["a"])) == with_config
    assert SearchConfig.model_validate(json.loads(rows["b"])) == without
    assert optuna.load_study(study_name="with", storage=storage).user_attrs[CONFIG_ATTR]
    storage.close()
    engine.dispose()
