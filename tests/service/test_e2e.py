"""End to end: `spsa-nas serve` as a real process, a search over HTTP on Ray, a crash and a restart."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load

from spsa_nas import ArchSpec, build_model
from tests.service.helpers import Server, add_user, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY = {
    "space": "quick",
    "dataset": {"name": "digits", "train_subset": 160},
    "train": {"epochs": 1, "batch_size": 16},
    "latency": {"repeats": 3, "warmup": 1},
}
# Short leases so that the crashed server's search and trials are taken over within seconds.
# (the trial lease may not be shorter than 3 x the SQLite busy timeout: service.core.settings)
FAST_LEASES = {"SPSA_NAS_LEASE_S": "6", "SPSA_NAS_TRIAL_LEASE_S": "45", "SPSA_NAS_DISPATCHER_POLL_S": "0.5"}


def test_submit_watch_download_crash_and_resume(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    token = add_user(data_dir, "alice")
    server = Server(data_dir, env=FAST_LEASES).start()
    try:
        client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        created = client.post("/api/v1/searches", json={**TINY, "trials": 2})
        assert created.status_code == 201, created.text
        url = created.json()["links"]["self"]
        done = wait_for(
            client, url, lambda b: b["status"] not in ("queued", "running"), 600, "search 1", server
        )
        assert done["status"] == "completed", (done, server.log())
        assert done["progress"]["finished"] == 2

        best = client.get(f"{url}/best").json()
        weights = client.get(f"{url}/best/weights")
        assert weights.status_code == 200
        spec = ArchSpec.model_validate(best["spec"])
        model = build_model(spec, weights=load(weights.content)).eval()
        assert not model.load_report.initialised and not model.load_report.mismatched
        with torch.no_grad():
            out = model(torch.randn(2, spec.in_channels, spec.input_size, spec.input_size))
        assert out.shape == (2, spec.num_classes) and torch.isfinite(out).all()

        # A second search; the server dies (SIGKILL, Ray with it) once a trial has finished.
        second = client.post("/api/v1/searches", json={**TINY, "trials": 4, "seed": 1}).json()
        url2 = second["links"]["self"]
        wait_for(client, url2, lambda b: b["progress"]["finished"] >= 1, 600, "a first trial", server)
        server.kill()
        server = Server(data_dir, port=server.port, env=FAST_LEASES).start()
        done2 = wait_for(
            client, url2, lambda b: b["status"] not in ("queued", "running"), 900, "search 2", server
        )
        assert done2["status"] == "completed", (done2, server.log())
        assert done2["progress"]["finished"] == 4  # exactly the trials asked, none run twice
        assert done2["progress"]["running"] == 0
        assert done2["summary"]["duplicate_claims"] == 0
        trials = client.get(f"{url2}/trials").json()["data"]
        finished = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
        assert len(finished) == 4
    finally:
        server.stop()
