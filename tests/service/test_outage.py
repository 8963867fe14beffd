"""A storage outage longer than the retry budget under a running search: the coordinator stops the
search's trials and releases it for resumption (never FAILED), then finishes it once the database
is back. The outages are real: on PostgreSQL, connections to the service's database are refused
(ALLOW_CONNECTIONS false) and the open ones ended with pg_terminate_backend; on SQLite, the
database file and its WAL are made unwritable (tests.fsfaults)."""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from service.testing import Server, add_user
from tests.fsfaults import unwritable
from tests.service.conftest import PG_ADMIN
from tests.service.helpers import wait_for

TINY = {
    "space": "quick",
    "dataset": {"name": "digits", "train_subset": 320},
    "train": {"epochs": 3, "batch_size": 16},
    "latency": {"repeats": 3, "warmup": 1},
}
LEASE_S = 6.0  # the search's lease: a lapse of it (database unreachable) stops the run


@pytest.fixture(params=["postgres", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(URL, PostgreSQL database name or SQLite file) of a new database of this test alone."""
    if request.param == "sqlite":
        path = tmp_path / "data" / "spsa-nas.db"
        yield f"sqlite:///{path}", str(path)
        return
    postgres_url = request.getfixturevalue("postgres_url")
    name = f"spsa_outage_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False), name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def database_down(url: str, name: str) -> Iterator[Callable[[], object]]:
    """The database cannot be written (SQLite) or reached (PostgreSQL: it refuses new connections
    and its open ones are ended) until the block exits; yields a function that ends the
    connections opened meanwhile (PostgreSQL) or does nothing."""
    if url.startswith("sqlite"):
        with unwritable(Path(name)):
            yield lambda: None
        return
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            end_connections(admin, name)
            yield lambda: end_connections(admin, name)
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def end_connections(admin: psycopg.Connection, name: str) -> int:
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,),
    ).fetchall()
    return len(rows)


def trial_processes(session_id: int) -> list[int]:
    """Ray worker processes of the server's session that run a trial now (Ray names a worker's
    process after the task it executes; the runner names trial tasks `spsa-nas-trial:<study>`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            sid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, ValueError, IndexError):
            continue
        if sid == session_id and cmdline.startswith("ray::spsa-nas-trial:"):
            found.append(int(entry.name))
    return found


def full_log(server: Server) -> str:
    return server.log_path.read_text() if server.log_path.exists() else ""


def wait_until(condition, timeout_s: float, what: str, server: Server) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            ps = subprocess.run(["ps", "-o", "pid,ppid,stat,etime,args", "-s", str(server.api_pid)],
                                capture_output=True, text=True).stdout
            raise AssertionError(f"timed out waiting for {what}:\n{ps}\n{server.log()}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.ray
def test_a_storage_outage_releases_the_search_and_it_finishes_after(
    tmp_path: Path, database: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, name = database
    data_dir = tmp_path / "data"
    env = {
        "SPSA_NAS_DATABASE_URL": url,
        "SPSA_NAS_LEASE_S": str(LEASE_S),
        "SPSA_NAS_DISPATCHER_POLL_S": "0.5",
    }
    monkeypatch.setenv("SPSA_NAS_DATABASE_URL", url)  # `spsa-nas users add` writes there
    token = add_user(data_dir, "alice")
    server = Server(data_dir, env=env).start()
    try:
        client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        created = client.post("/api/v1/searches", json={**TINY, "trials": 2})
        assert created.status_code == 201, created.text
        url_search = created.json()["links"]["self"]
        wait_for(client, url_search, lambda b: b["progress"]["running"] >= 1, 600, "a running trial", server)
        wait_until(lambda: trial_processes(server.api_pid) != [], 120, "a trial process", server)

        with database_down(url, name) as end_new_connections:
            # Down for longer than the lease and the storage retries: the coordinator must stop the
            # run (its trial processes end) and give the search back, not fail it.
            lapsed = "stopping its run, to be resumed"
            wait_until(lambda: lapsed in full_log(server), 120, "the lease lapse", server)
            wait_until(lambda: trial_processes(server.api_pid) == [], 120, "the trials to stop", server)
            end_new_connections()
            wait_until(lambda: "released for resumption" in full_log(server), 120, "the run's end", server)

        # Back: the search is resumed (by this coordinator once its lease is free) and completes.
        done = wait_for(client, url_search, lambda b: b["status"] not in ("queued", "running"), 900,
                        "the search", server)
        assert done["status"] == "completed", (done, server.log())
        assert done["error"] is None, done
        trials = client.get(f"{url_search}/trials").json()["data"]
        complete = [t for t in trials if t["state"] == "COMPLETE"]
        assert len(complete) == 2, trials  # exactly the trials asked for, none counted twice
        engine = create_engine(url)
        with engine.connect() as db:
            attempts = db.execute(text("SELECT attempts FROM searches WHERE id = :id"), {"id": done["id"]})
            assert attempts.scalar_one() >= 2  # released and claimed again, not run through
        engine.dispose()
    finally:
        server.kill()
