"""The queue's fair order (round-robin across users, priority first) and migration 0004, over SQLite
and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, text, update
from sqlalchemy.orm import Session, sessionmaker

from service import crud
from service.core.db import alembic_config, make_engine, migrate
from service.core.models import COMPLETED, QUEUED, Search, User, utcnow
from tests.service.conftest import own_database

Sessions = sessionmaker[Session]


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _queue(sessions: Sessions, user: str, count: int, *, first_age_s: float) -> list[str]:
    """`count` searches queued by `user` (created if new), one second apart from `first_age_s` ago."""
    with sessions() as session:
        owner = session.query(User).filter_by(name=user).one_or_none()
        if owner is None:
            owner, _ = crud.create_user(session, name=user)
        ids = []
        for i in range(count):
            search_id = f"{user}-{i}"
            search = crud.create_search(
                session, search_id=search_id, owner=owner, name=None, study_name=search_id
            )
            search.created_at = utcnow() - timedelta(seconds=first_age_s - i)
            ids.append(search_id)
        session.commit()
    return ids


def _claim(sessions: Sessions) -> Search | None:
    with sessions() as session:
        return crud.claim_next_search(session, owner="dispatcher", lease_s=60)


def _run_with_one_slot(sessions: Sessions, runs: int) -> list[str]:
    """The ids claimed by one dispatcher with one slot: each claimed search completes before the next."""
    order = []
    for _ in range(runs):
        search = _claim(sessions)
        assert search is not None
        order.append(search.id)
        with sessions() as session:
            assert crud.finish_search(
                session, search_id=search.id, owner="dispatcher", status=COMPLETED, token=search.lease_token
            )
    return order


def test_one_users_queue_does_not_delay_another_users_first_search(sessions: Sessions) -> None:
    alice = _queue(sessions, "alice", 8, first_age_s=100)
    bob = _queue(sessions, "bob", 1, first_age_s=50)  # queued after all of alice's
    order = _run_with_one_slot(sessions, 9)
    assert order[0] == alice[0]  # alice queued first
    assert order[1] == bob[0]  # bob second at the latest, not ninth
    assert order[2:] == alice[1:]  # then alice's, oldest first
    assert _claim(sessions) is None


def test_users_are_served_in_turn(sessions: Sessions) -> None:
    alice = _queue(sessions, "alice", 3, first_age_s=100)
    bob = _queue(sessions, "bob", 3, first_age_s=50)
    order = _run_with_one_slot(sessions, 6)
    assert order == [alice[0], bob[0], alice[1], bob[1], alice[2], bob[2]]


def test_with_several_slots_the_user_running_fewest_goes_first(sessions: Sessions) -> None:
    alice = _queue(sessions, "alice", 4, first_age_s=100)
    bob = _queue(sessions, "bob", 2, first_age_s=50)
    first, second, third = (_claim(sessions) for _ in range(3))  # three slots, none finishes
    assert [getattr(s, "id", None) for s in (first, second, third)] == [alice[0], bob[0], alice[1]]


def test_a_priority_bump_is_served_first(sessions: Sessions) -> None:
    alice = _queue(sessions, "alice", 3, first_age_s=100)
    bob = _queue(sessions, "bob", 2, first_age_s=50)
    with sessions() as session:  # what the admin's priority route writes
        session.execute(update(Search).where(Search.id == bob[1]).values(priority=5))
        session.commit()
    order = _run_with_one_slot(sessions, 2)
    assert order == [bob[1], alice[0]]


def test_a_user_at_the_running_cap_waits_while_others_start(sessions: Sessions) -> None:
    alice = _queue(sessions, "alice", 3, first_age_s=100)
    bob = _queue(sessions, "bob", 1, first_age_s=50)

    def claim() -> Search | None:
        with sessions() as session:
            return crud.claim_next_search(session, owner="d", lease_s=60, max_running_per_user=2)

    started = [claim(), claim(), claim()]
    assert [s.id if s else None for s in started] == [alice[0], bob[0], alice[1]]
    assert claim() is None  # alice runs 2 (her cap), bob has nothing queued: alice's third waits
    with sessions() as session:  # one of alice's ends: her third may start
        session.execute(update(Search).where(Search.id == alice[0]).values(status=COMPLETED))
        session.commit()
    last = claim()
    assert last is not None and last.id == alice[2]
    expired = utcnow() - timedelta(seconds=5)
    with sessions() as session:  # an expired lease is a resumption, not a new run: never capped
        session.execute(update(Search).where(Search.id == alice[1]).values(lease_expires_at=expired))
        session.commit()
    resumed = claim()
    assert resumed is not None and resumed.id == alice[1]


def test_an_orphaned_running_search_is_resumed_before_queued_ones(sessions: Sessions) -> None:
    alice = _queue(sessions, "alice", 1, first_age_s=100)
    bob = _queue(sessions, "bob", 1, first_age_s=50)
    first = _claim(sessions)
    assert first is not None and first.id == alice[0]
    with sessions() as session:  # its coordinator died: the lease ran out
        expired = utcnow() - timedelta(seconds=1)
        session.execute(update(Search).where(Search.id == alice[0]).values(lease_expires_at=expired))
        session.commit()
    resumed = _claim(sessions)
    assert resumed is not None and resumed.id == alice[0]
    assert getattr(_claim(sessions), "id", None) == bob[0]


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from own_database(request, tmp_path, "spsa_fair")


def test_migration_0004_adds_priority_and_lease_token_and_back(empty_url: str) -> None:
    engine = make_engine(empty_url)
    migrate(engine, "0003")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, name, is_admin, is_active, created_at) "
                          "VALUES (1, 'alice', false, true, '2026-01-01')"))
        conn.execute(text("INSERT INTO searches (id, owner_id, study_name, status, created_at, attempts) "
                          "VALUES ('old', 1, 'old', 'queued', '2026-01-01', 2)"))
    migrate(engine)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT priority, lease_token, attempts, status FROM searches")).one()
    assert tuple(row) == (0, 0, 2, QUEUED)  # an existing row gets the defaults

    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0003")
    columns = {c["name"] for c in inspect(engine).get_columns("searches")}
    assert {"priority", "lease_token"}.isdisjoint(columns) and "attempts" in columns
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM searches")).scalars().all() == ["old"]
    engine.dispose()
