"""The process design: the API imports neither Ray nor torch while it serves, and killing the API
process alone mid-search interrupts no trial (its coordinator child runs on)."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from service.testing import pid_alive
from tests.service.conftest import tiny_spec
from tests.service.helpers import Server, add_user, wait_for

ROOT = Path(__file__).resolve().parents[2]

# Serves every API route a client calls, over a search with a completed trial whose weights and
# ONNX files are plain bytes (made without torch), then reports which heavy modules were imported.
SERVE_WITHOUT_HEAVY_IMPORTS = textwrap.dedent(
    """
    import json, sys, tempfile
    from pathlib import Path

    import optuna
    from fastapi.testclient import TestClient

    from service import crud
    from service.app import create_app
    from service.core.settings import Settings
    from service.runtime import build_runtime

    settings = Settings(data_dir=Path(sys.argv[1]), concurrent_searches=0)
    runtime = build_runtime(settings)
    with runtime.sessions() as session:
        _, token = crud.create_user(session, name="alice")
        session.commit()
    headers = {"Authorization": f"Bearer {token}"}
    body = {"space": "quick", "dataset": {"name": "digits"}, "trials": 3}
    statuses = {}
    with TestClient(create_app(settings, runtime=runtime)) as client:
        created = client.post("/api/v1/searches", json=body, headers=headers)
        statuses["create"] = created.status_code
        search = created.json()
        study = optuna.load_study(study_name=search["study_name"], storage=runtime.storage)
        trial = study.ask()
        for key in ("weights", "onnx"):
            path = Path(tempfile.mkdtemp()) / key
            path.write_bytes(b"not a model: " + key.encode())
            artifact = optuna.artifacts.upload_artifact(
                artifact_store=runtime.artifact_store, file_path=str(path), study_or_trial=trial)
            trial.set_user_attr(f"{key}_artifact", artifact)
        for key, value in {"spec": json.loads(sys.argv[2]), "val_acc": 0.9, "latency_ms": 1.0,
                           "feasible": True}.items():
            trial.set_user_attr(key, value)
        study.tell(trial, [0.9, 1.0])
        base = search["links"]["self"]
        for path in ("/healthz", "/api/v1/spaces", "/api/v1/searches", base, f"{base}/trials",
                     f"{base}/pareto", f"{base}/best", f"{base}/best/weights", f"{base}/best/onnx"):
            statuses[path] = client.get(path, headers=headers).status_code
        statuses["cancel"] = client.post(f"{base}/cancel", headers=headers).status_code
    print(statuses)
    print("HEAVY", sorted(m for m in ("ray", "torch") if m in sys.modules))
    """
)


def test_the_api_serves_without_ray_or_torch(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_HEAVY_IMPORTS, str(tmp_path), json.dumps(tiny_spec())],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    statuses_line, heavy = result.stdout.strip().splitlines()[-2:]
    statuses = ast.literal_eval(statuses_line)
    assert statuses.pop("create") == 201 and statuses.pop("cancel") == 200, statuses_line
    assert set(statuses.values()) == {200}, statuses_line
    assert heavy == "HEAVY []", result.stdout  # neither "ray" nor "torch" in sys.modules


TINY = {
    "space": "quick",
    "dataset": {"name": "digits", "train_subset": 160},
    "train": {"epochs": 1, "batch_size": 16},
    "latency": {"repeats": 3, "warmup": 1},
}


@pytest.mark.slow
@pytest.mark.ray
def test_killing_the_api_alone_interrupts_no_trial(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    token = add_user(data_dir, "alice")
    env = {"SPSA_NAS_DISPATCHER_POLL_S": "0.5"}
    server = Server(data_dir, env=env).start()
    coordinator = server.coordinator_pid()
    replacement: Server | None = None
    try:
        client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        created = client.post("/api/v1/searches", json={**TINY, "trials": 3})
        assert created.status_code == 201, created.text
        url = created.json()["links"]["self"]
        wait_for(client, url, lambda b: b["progress"]["running"] >= 1, 600, "a running trial", server)
        with contextlib.closing(sqlite3.connect(data_dir / "spsa-nas.db")) as db:  # published at its start
            reports = [json.loads(row[0]) for row in db.execute("SELECT resources FROM coordinators")]
        assert len(reports) == 1 and reports[0]["CPU"] > 0, reports  # what the API checks submissions by

        server.kill_api()  # SIGKILL, the API process alone
        assert pid_alive(coordinator), "the coordinator died with its API"
        # A new API on the same port; no coordinator of its own, so the old one must finish the search.
        replacement = Server(data_dir, port=server.port, env={**env, "SPSA_NAS_CONCURRENT_SEARCHES": "0"})
        replacement.start()
        done = wait_for(client, url, lambda b: b["status"] not in ("queued", "running"), 900, "the search",
                        replacement)
        assert done["status"] == "completed", (done, server.log())
        assert done["progress"]["finished"] == 3 and done["progress"]["failed"] == 0, done
        trials = client.get(f"{url}/trials").json()["data"]
        assert [t["state"] for t in trials if t["state"] not in ("COMPLETE", "PRUNED")] == [], trials
        assert len(trials) == 3  # none failed, none retried
        summary = done["summary"]
        assert summary["recovered"] == [] and summary["retries_enqueued"] == 0, summary
        # Its API gone and its searches done, the old coordinator exits on its own.
        deadline = time.monotonic() + 120
        while pid_alive(coordinator) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(coordinator), f"the orphaned coordinator did not exit:\n{server.log()}"
    finally:
        if replacement is not None:
            replacement.stop()
        if pid_alive(coordinator):
            os.kill(coordinator, signal.SIGTERM)
        server.kill()  # what is left of the first session (Ray's processes)
