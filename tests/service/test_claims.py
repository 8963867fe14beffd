"""The dispatcher's claims on searches (claim, renew, finish, release) over SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from service import crud
from service.core.db import make_engine, make_session_factory
from service.core.models import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    Search,
    utcnow,
)
from service.crud.claims import cancel_search_row, db_now

LEASE_S = 60.0
CLAIMERS = 8  # threads racing at once (PostgreSQL's pool gives each its own connection)
Sessions = sessionmaker[Session]


def _add_search(
    sessions: Sessions, search_id: str, *, age_s: float = 0.0, status: str = QUEUED
) -> None:
    """A search created `age_s` seconds ago (by a user of its own) in state `status`."""
    with sessions() as session:
        owner, _ = crud.create_user(session, name=f"u{uuid.uuid4().hex[:8]}")
        search = crud.create_search(
            session, search_id=search_id, owner=owner, name=None, study_name=search_id
        )
        search.created_at = utcnow() - timedelta(seconds=age_s)
        search.status = status
        session.commit()


def _row(sessions: Sessions, search_id: str) -> Search:
    """The row as committed, read by a session of its own."""
    with sessions() as session:
        search = session.get(Search, search_id)
        assert search is not None, f"search {search_id} vanished"
        return search


def _claim(sessions: Sessions, owner: str, lease_s: float = LEASE_S) -> Search | None:
    with sessions() as session:
        return crud.claim_next_search(session, owner=owner, lease_s=lease_s)


def _expire(sessions: Sessions, search_id: str, **values: object) -> None:
    """Put the search's lease one second in the past (and set `values`), as a dead dispatcher leaves it."""
    with sessions() as session:
        session.execute(
            update(Search)
            .where(Search.id == search_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1), **values)
        )
        session.commit()


def _race(sessions: Sessions) -> dict[str, str | None]:
    """CLAIMERS threads, each with a session of its own, released at once by a barrier to claim;
    returns what each claimer got (a search id, or None)."""
    barrier = threading.Barrier(CLAIMERS)
    won: dict[str, str | None] = {}
    errors: list[BaseException] = []

    def claimer(owner: str) -> None:
        try:
            with sessions() as session:
                session.connection()  # connected before the barrier: the claims start together
                barrier.wait(timeout=30)
                search = crud.claim_next_search(session, owner=owner, lease_s=LEASE_S)
                won[owner] = None if search is None else search.id
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(f"racer-{i}",)) for i in range(CLAIMERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(won) == CLAIMERS, f"claimers hung: {CLAIMERS - len(won)}"
    return won


def _between(value: datetime | None, low: datetime, high: datetime) -> bool:
    """`value` (written by the database's clock) lies in [low, high] (read from ours); SQLite's clock
    has milliseconds, so `low` is first truncated to them."""
    low = low.replace(microsecond=low.microsecond // 1000 * 1000)
    return value is not None and low <= value <= high


def test_a_claim_takes_the_oldest_queued_search_and_marks_it_running(sessions: Sessions) -> None:
    # ids sort the other way round from age: only created_at can give this order
    _add_search(sessions, "a-newest", age_s=10)
    _add_search(sessions, "c-oldest", age_s=30)
    _add_search(sessions, "b-middle", age_s=20)
    before = utcnow()
    claimed = _claim(sessions, "dispatcher-1")
    after = utcnow()

    assert claimed is not None and claimed.id == "c-oldest"
    assert claimed.status == RUNNING  # what the dispatcher is handed
    row = _row(sessions, "c-oldest")  # and what was committed
    assert row.status == RUNNING
    assert _between(row.started_at, before, after)
    assert row.lease_owner == "dispatcher-1"
    lease = timedelta(seconds=LEASE_S)
    assert _between(row.lease_expires_at, before + lease, after + lease)
    assert row.attempts == 1
    for other in ("a-newest", "b-middle"):
        untouched = _row(sessions, other)
        assert (untouched.status, untouched.lease_owner, untouched.attempts) == (QUEUED, None, 0)

    next_claims = [getattr(_claim(sessions, "dispatcher-2"), "id", None) for _ in range(3)]
    assert next_claims == ["b-middle", "a-newest", None]


def test_a_live_lease_is_not_claimed_by_another_dispatcher(sessions: Sessions) -> None:
    _add_search(sessions, "held")
    assert getattr(_claim(sessions, "dispatcher-1"), "id", None) == "held"
    assert _claim(sessions, "dispatcher-2") is None
    assert _claim(sessions, "dispatcher-1") is None  # not even by its holder: it runs it already
    row = _row(sessions, "held")
    assert (row.lease_owner, row.attempts) == ("dispatcher-1", 1)


@pytest.mark.parametrize("expired", [False, True], ids=["queued", "expired-lease"])
def test_claimers_racing_for_one_search_exactly_one_wins(sessions: Sessions, expired: bool) -> None:
    _add_search(sessions, "contested")
    if expired:  # a dead dispatcher's search, its lease run out
        assert _claim(sessions, "dead") is not None
        _expire(sessions, "contested")
    won = _race(sessions)
    winners = [owner for owner, search_id in won.items() if search_id is not None]
    assert len(winners) == 1, won
    assert won[winners[0]] == "contested"
    row = _row(sessions, "contested")
    assert row.lease_owner == winners[0]
    assert row.attempts == (2 if expired else 1)  # incremented once, by the winner only
    assert row.status == RUNNING


def test_racing_claimers_share_several_searches_one_each(sessions: Sessions) -> None:
    searches = [f"s{i}" for i in range(3)]
    for i, search_id in enumerate(searches):
        _add_search(sessions, search_id, age_s=10 - i)
    won = _race(sessions)
    taken = sorted(search_id for search_id in won.values() if search_id is not None)
    assert taken == searches  # every search taken, none twice, nobody left out while one was free
    for search_id in searches:
        row = _row(sessions, search_id)
        assert won[str(row.lease_owner)] == search_id and row.attempts == 1


@pytest.mark.parametrize("status", [RUNNING, CANCELLING])
def test_an_expired_lease_is_claimed_again_keeping_status_and_start(
    sessions: Sessions, status: str
) -> None:
    _add_search(sessions, "orphan")
    assert _claim(sessions, "dead") is not None
    started = _row(sessions, "orphan").started_at
    assert started is not None
    # the dead dispatcher's search, a cancel asked meanwhile or not
    _expire(sessions, "orphan", status=status)

    before = utcnow()
    claimed = _claim(sessions, "heir")
    assert claimed is not None and claimed.id == "orphan"
    assert claimed.status == status  # a resumed search is handed over as it was
    row = _row(sessions, "orphan")
    assert row.status == status
    assert row.started_at == started
    assert row.lease_owner == "heir"
    lease = timedelta(seconds=LEASE_S)
    assert _between(row.lease_expires_at, before + lease, utcnow() + lease)
    assert row.attempts == 2


def test_a_running_search_with_no_lease_at_all_is_claimable(sessions: Sessions) -> None:
    _add_search(sessions, "leaseless", status=RUNNING)  # e.g. written by an older version
    claimed = _claim(sessions, "dispatcher-1")
    assert claimed is not None and claimed.id == "leaseless"
    assert _row(sessions, "leaseless").lease_owner == "dispatcher-1"


@pytest.mark.parametrize("status", [CANCELLED, COMPLETED, FAILED])
def test_final_searches_are_never_claimed(sessions: Sessions, status: str) -> None:
    _add_search(sessions, "over", status=status)
    assert _claim(sessions, "dispatcher-1") is None
    _expire(sessions, "over")  # not even with a lease long past
    assert _claim(sessions, "dispatcher-1") is None
    row = _row(sessions, "over")
    assert (row.status, row.lease_owner, row.attempts) == (status, None, 0)


def test_a_queued_search_cancelled_by_its_owner_is_never_claimed(sessions: Sessions) -> None:
    _add_search(sessions, "changed-mind")
    with sessions() as session:
        crud.cancel_search_row(session, search_id="changed-mind")  # what the cancel route calls
    assert _claim(sessions, "dispatcher-1") is None
    assert _row(sessions, "changed-mind").status == CANCELLED


def test_renew_extends_only_our_own_claim_and_returns_the_status(sessions: Sessions) -> None:
    _add_search(sessions, "long")
    assert _claim(sessions, "mine", lease_s=5) is not None
    first = _row(sessions, "long").lease_expires_at
    assert first is not None

    with sessions() as session:
        assert crud.renew_lease(session, search_id="long", owner="theirs", lease_s=3600) is None
    assert _row(sessions, "long").lease_expires_at == first  # a stranger's renewal changes nothing

    before = utcnow()
    with sessions() as session:
        assert crud.renew_lease(session, search_id="long", owner="mine", lease_s=3600) == RUNNING
    renewed = _row(sessions, "long")
    assert renewed.lease_owner == "mine"
    hour = timedelta(hours=1)
    assert _between(renewed.lease_expires_at, before + hour, utcnow() + hour)

    with sessions() as session:  # the owner asks to cancel: the holder learns it by renewing
        crud.cancel_search_row(session, search_id="long")  # what the cancel route calls
    with sessions() as session:
        assert crud.renew_lease(session, search_id="long", owner="mine", lease_s=60) == CANCELLING


def test_renew_after_another_dispatcher_took_over_says_the_claim_is_lost(sessions: Sessions) -> None:
    _add_search(sessions, "taken")
    assert _claim(sessions, "slow") is not None
    _expire(sessions, "taken")
    assert getattr(_claim(sessions, "fast"), "id", None) == "taken"
    taken_over = _row(sessions, "taken").lease_expires_at

    with sessions() as session:
        assert crud.renew_lease(session, search_id="taken", owner="slow", lease_s=3600) is None
    row = _row(sessions, "taken")
    assert (row.lease_owner, row.lease_expires_at) == ("fast", taken_over)


def test_only_the_holder_finishes_a_search(sessions: Sessions) -> None:
    _add_search(sessions, "done")
    assert _claim(sessions, "holder") is not None

    with sessions() as session:
        assert not crud.finish_search(session, search_id="done", owner="stranger", status=FAILED, error="no")
    row = _row(sessions, "done")
    assert (row.status, row.error, row.finished_at, row.lease_owner) == (RUNNING, None, None, "holder")

    before = utcnow()
    with sessions() as session:
        assert crud.finish_search(
            session, search_id="done", owner="holder", status=COMPLETED, result_json='{"finished": 3}'
        )
    row = _row(sessions, "done")
    assert (row.status, row.error, row.result) == (COMPLETED, None, '{"finished": 3}')
    assert _between(row.finished_at, before, utcnow())
    assert (row.lease_owner, row.lease_expires_at) == (None, None)
    with sessions() as session:  # the lease is gone with the search: nothing left to renew
        assert crud.renew_lease(session, search_id="done", owner="holder", lease_s=60) is None
    assert _claim(sessions, "anyone") is None


def test_a_released_search_is_claimable_by_another_dispatcher_at_once(sessions: Sessions) -> None:
    _add_search(sessions, "handed-back")
    assert _claim(sessions, "stopping") is not None
    started = _row(sessions, "handed-back").started_at

    with sessions() as session:  # a stranger cannot give away what it does not hold
        crud.release_search(session, search_id="handed-back", owner="stranger")
    assert _row(sessions, "handed-back").lease_owner == "stopping"
    assert _claim(sessions, "next") is None

    with sessions() as session:
        crud.release_search(session, search_id="handed-back", owner="stopping")
    released = _row(sessions, "handed-back")
    assert (released.status, released.lease_owner) == (RUNNING, None)

    claimed = _claim(sessions, "next")  # no waiting for the old lease to run out
    assert claimed is not None and claimed.id == "handed-back"
    row = _row(sessions, "handed-back")
    assert (row.status, row.started_at, row.lease_owner, row.attempts) == (RUNNING, started, "next", 2)


def test_claims_live_in_the_database_not_in_a_process(engine: Engine, sessions: Sessions) -> None:
    """A second engine (another server process on the same database) sees the claims of the first."""
    other_engine = make_engine(engine.url.render_as_string(hide_password=False))
    other = make_session_factory(other_engine)
    try:
        _add_search(sessions, "shared")
        assert _claim(sessions, "server-a") is not None
        assert _claim(other, "server-b") is None
        _expire(sessions, "shared")
        assert getattr(_claim(other, "server-b"), "id", None) == "shared"
        with sessions() as session:
            assert crud.renew_lease(session, search_id="shared", owner="server-a", lease_s=60) is None
    finally:
        other_engine.dispose()


# --- fencing tokens, the database's clock, and cancels racing claims and finishes -----------------


def test_db_now_is_the_database_clock_in_naive_utc(sessions: Sessions) -> None:
    before = utcnow()
    with sessions() as session:
        now, later = session.execute(select(db_now(), db_now(3600))).one()
    assert _between(now, before, utcnow())
    assert _between(later, before + timedelta(hours=1), utcnow() + timedelta(hours=1))


def test_every_claim_gets_a_new_fencing_token(sessions: Sessions) -> None:
    _add_search(sessions, "fenced")
    first = _claim(sessions, "dispatcher")
    assert first is not None
    _expire(sessions, "fenced")
    second = _claim(sessions, "dispatcher")  # the same owner name claims it again
    assert second is not None and second.lease_token == first.lease_token + 1
    assert _row(sessions, "fenced").lease_token == second.lease_token


def test_a_stale_token_cannot_renew_finish_or_release_after_a_takeover(sessions: Sessions) -> None:
    """A coordinator that stalled past its lease, taken over by another of the same owner name
    (another thread of the same process): only the token tells them apart."""
    _add_search(sessions, "stalled")
    stale = _claim(sessions, "server")
    assert stale is not None
    _expire(sessions, "stalled")
    fresh = _claim(sessions, "server")
    assert fresh is not None
    taken_over = _row(sessions, "stalled")

    held = {"search_id": "stalled", "owner": "server", "token": stale.lease_token}
    with sessions() as session:
        assert crud.renew_lease(session, lease_s=3600, **held) is None  # type: ignore[arg-type]
        assert crud.claimed_status(session, **held) is None  # type: ignore[arg-type]
        assert not crud.finish_search(session, status=FAILED, error="stale", **held)  # type: ignore[arg-type]
        assert not crud.release_search(session, **held)  # type: ignore[arg-type]
    row = _row(sessions, "stalled")
    assert (row.status, row.error, row.lease_owner, row.lease_expires_at) == (
        RUNNING, None, "server", taken_over.lease_expires_at
    )

    with sessions() as session:  # the current holder's token works
        assert crud.renew_lease(
            session, search_id="stalled", owner="server", lease_s=60, token=fresh.lease_token
        ) == RUNNING
        assert crud.finish_search(
            session, search_id="stalled", owner="server", status=COMPLETED, token=fresh.lease_token
        )
    assert _row(sessions, "stalled").status == COMPLETED


def _together(*calls: Callable[[Session], object], sessions: Sessions) -> list[object]:
    """Run each call in a thread with a session of its own, released at once by a barrier."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            with sessions() as session:
                session.connection()
                barrier.wait(timeout=30)
                results[index] = calls[index](session)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads), "a racer hung"
    return results


@pytest.mark.parametrize("round_", range(5))
def test_a_cancel_racing_a_claim_ends_cancelled(sessions: Sessions, round_: int) -> None:
    _add_search(sessions, "racing")
    claimed, cancelled_as = _together(
        lambda session: crud.claim_next_search(session, owner="dispatcher", lease_s=LEASE_S),
        lambda session: cancel_search_row(session, search_id="racing"),
        sessions=sessions,
    )
    row = _row(sessions, "racing")
    if claimed is None:  # the cancel came first: never claimed, cancelled at once
        assert cancelled_as == CANCELLED
        assert (row.status, row.lease_owner, row.attempts) == (CANCELLED, None, 0)
    else:  # the claim came first: the holder learns of the cancel and ends it cancelled
        assert isinstance(claimed, Search)
        assert cancelled_as == CANCELLING and row.status == CANCELLING
        with sessions() as session:
            token = claimed.lease_token
            assert crud.renew_lease(
                session, search_id="racing", owner="dispatcher", lease_s=LEASE_S, token=token
            ) == CANCELLING
            assert crud.finish_search(
                session, search_id="racing", owner="dispatcher", status=CANCELLED, token=token
            )
    assert _row(sessions, "racing").status == CANCELLED
    assert _claim(sessions, "anyone") is None


@pytest.mark.parametrize("round_", range(5))
def test_a_completion_racing_a_cancel_ends_as_whichever_was_committed_first(
    sessions: Sessions, round_: int
) -> None:
    """The rule (service/crud/claims.py): a cancel committed before the finish wins (cancelled,
    the report kept); one that comes after finds the search completed and changes nothing."""
    _add_search(sessions, "ending")
    holder = _claim(sessions, "dispatcher")
    assert holder is not None
    finished, cancelled_as = _together(
        lambda session: crud.finish_search(
            session, search_id="ending", owner="dispatcher", status=COMPLETED,
            result_json='{"finished": 3}', token=holder.lease_token,
        ),
        lambda session: cancel_search_row(session, search_id="ending"),
        sessions=sessions,
    )
    assert finished  # the holder's finish is never refused by a cancel
    row = _row(sessions, "ending")
    assert row.result == '{"finished": 3}' and row.lease_owner is None
    if cancelled_as == CANCELLING:  # the cancel was committed first: the user's request wins
        assert row.status == CANCELLED
    else:  # the finish was committed first: the cancel found a final search
        assert cancelled_as == COMPLETED and row.status == COMPLETED


def test_a_cancel_of_a_final_search_changes_nothing(sessions: Sessions) -> None:
    _add_search(sessions, "over", status=COMPLETED)
    with sessions() as session:
        assert cancel_search_row(session, search_id="over") == COMPLETED
        assert cancel_search_row(session, search_id="missing") is None
    assert _row(sessions, "over").status == COMPLETED
