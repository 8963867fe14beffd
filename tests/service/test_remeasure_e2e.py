"""End to end on a real server and coordinator: a tiny search of the `spatial_ablation` space answers its
ablation table (GET .../compare, `spsa-nas remote compare`), and its finalists are re-measured again on
demand (POST .../remeasure: 409 before the end and while pending, 404 for another user, then the
coordinator runs it and `/pareto` and `/best` answer the new figures)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.helpers import Server, add_user, cli, wait_for
from tests.service.test_latency_e2e import TINY

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SEARCH = {**TINY, "space": "spatial_ablation", "trials": 4, "sampler": "random"}


def _remeasured(body: dict[str, Any]) -> bool:
    return bool(body["data"]) and all("latency_remeasured_ms" in t["metrics"] for t in body["data"])


def _stage1(spec: dict[str, Any]) -> str:
    stage = spec["stages"][0]
    return "spsa" if stage.get("spsa") else stage.get("spatial_attn", "none")


def test_compare_and_remeasure_on_demand(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    token, other = add_user(data_dir, "alice"), add_user(data_dir, "bob")
    server = Server(data_dir).start()
    try:
        client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        bob = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {other}"}, timeout=60)
        created = client.post("/api/v1/searches", json=SEARCH)
        assert created.status_code == 201, created.text
        url = created.json()["links"]["self"]

        early = client.post(f"{url}/remeasure")  # queued or running: not finished
        assert early.status_code == 409 and "re-measured when it ends" in early.json()["detail"]
        so_far = client.get(f"{url}/compare").json()
        assert so_far["finished"] is False

        done = wait_for(client, url, lambda b: b["status"] not in ("queued", "running"), 900, "the search",
                        server)
        assert done["status"] == "completed", (done, server.log())
        assert done["remeasure"]["state"] == "none"

        # the table: its counts agree with the trials' own specs
        trials = client.get(f"{url}/trials").json()["data"]
        complete = [t for t in trials if t["state"] == "COMPLETE"]
        table = client.get(f"{url}/compare").json()
        assert table["finished"] is True and table["counts"]["summarised"] == len(complete) > 0
        stage1 = {c["choice"]: c for c in table["cells"]
                  if c["dimension"] == "spatial_attn" and c["scope"] == "stage 1"}
        by_hand = Counter(_stage1(t["spec"]) for t in complete)
        assert {choice: cell["n"] for choice, cell in stage1.items()} == dict(by_hand)
        for choice, cell in stage1.items():
            accs = [t["metrics"]["val_acc"] for t in complete if _stage1(t["spec"]) == choice]
            assert cell["val_acc_mean"] == pytest.approx(sum(accs) / len(accs))
        env = {"SPSA_NAS_URL": server.url, "SPSA_NAS_TOKEN": token}
        printed = cli("remote", "compare", created.json()["id"], env=env)
        assert printed.returncode == 0, printed.stderr
        assert "spatial attention" in printed.stdout and "completed trials summarised" in printed.stdout
        as_json = cli("remote", "compare", created.json()["id"], "--json", env=env)
        assert json.loads(as_json.stdout)["cells"] == table["cells"]

        # the finalists were re-measured at the end; now once more, on demand
        front = wait_for(client, f"{url}/pareto", _remeasured, 120, "the re-measured front", server)["data"]
        first = {t["number"]: t["metrics"]["latency_remeasured_at"] for t in front}
        assert bob.post(f"{url}/remeasure").status_code == 404
        accepted = client.post(f"{url}/remeasure")
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["remeasure"]["state"] in ("pending", "running")
        again = client.post(f"{url}/remeasure")
        assert again.status_code == 409 and "pending already" in again.json()["detail"]
        status = wait_for(client, url, lambda b: b["remeasure"]["state"] in ("done", "failed"), 600,
                          "the re-measurement", server)
        assert status["remeasure"]["state"] == "done", (status["remeasure"], server.log())
        assert status["remeasure"]["count"] == 1 and status["remeasure"]["finished_at"]

        front = client.get(f"{url}/pareto").json()["data"]
        assert {t["number"] for t in front} == set(first)  # the same finalists, measured again
        for trial in front:
            metrics = trial["metrics"]
            assert datetime.fromisoformat(metrics["latency_remeasured_at"]) > datetime.fromisoformat(
                first[trial["number"]]), (trial, first)
            low, high = metrics["latency_remeasured_ci_ms"]
            assert low <= metrics["latency_remeasured_ms"] <= high
        at = client.get(f"{url}/best").json()["metrics"]["latency_remeasured_at"]
        assert at == front[0]["metrics"]["latency_remeasured_at"]
        assert client.get(f"{url}/compare").json()["remeasured_at"] == at
        # a new request may follow the finished one, from the command line too
        asked = cli("remote", "remeasure", created.json()["id"], env=env)
        assert asked.returncode == 0, asked.stderr
        assert json.loads(asked.stdout)["remeasure"]["state"] in ("pending", "running")
        refused = cli("remote", "remeasure", created.json()["id"], env={**env, "SPSA_NAS_TOKEN": other})
        assert refused.returncode == 2 and "HTTP 404" in refused.stderr  # bob's view: no such search
    finally:
        server.stop()
