"""The oneshot supernets on the Ray runner: one survives the SIGKILL of its training worker (Ray
runs its task again, which resumes from the last epoch's checkpoint artifact), and two widths train
at once without losing each other's records."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from search_spaces.config import OneshotConfig, SearchConfig
from search_spaces.keys import PHASE_ATTR, supernet_records
from search_spaces.storage import open_storage
from search_spaces.study import create_study
from service.testing import pid_alive
from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY = {"name": "tiny", "backbone": "resnet18", "stem": "cifar", "input_size": 8, "width": 0.125,
        "all_stages": {"spsa": [False, True], "heads": [1, 2], "channel_attn": ["none", "se", "eca"]}}
EPOCHS = 4


def _record(url: str, name: str) -> dict[str, Any]:
    storage = open_storage(url)
    try:
        attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    finally:
        storage.close()
    return dict(next(iter((supernet_records(attrs) or {"": {}}).values())))


def _wait_record(url: str, name: str, predicate: Callable[[dict[str, Any]], bool], run: Future,
                 timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = _record(url, name)
        if predicate(record):
            return record
        if run.done():
            raise AssertionError(f"the run ended first ({run.result()}); supernet record {record}")
        time.sleep(0.05)
    raise AssertionError(f"timed out; supernet record {_record(url, name)}")


def test_supernet_on_ray_train_resumes_after_its_worker_was_killed(tmp_path: Path, ray_local: None) -> None:
    from workers.ray_runner import RunnerOptions, run_search

    url, artifacts = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "artifacts"
    cfg = SearchConfig(study_name="osr", space=TINY, dataset=DataConfig(name="digits", train_subset=200),
                       trials=2, train=TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=4),
                       latency=LatencyConfig(repeats=3, warmup=1), device="cpu", strategy="oneshot",
                       retrain_top_k=0, oneshot=OneshotConfig(epochs=EPOCHS, bn_batches=1))
    study = create_study(cfg, url)
    options = RunnerOptions(poll_s=0.2, remeasure_finalists=False)
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(run_search, "osr", url, artifact_dir=artifacts, options=options)
        # epoch 1's checkpoint is stored: SIGKILL the worker (a Ray task) that wrote it (an OOM kill)
        first = _wait_record(url, "osr", lambda r: r.get("epoch", 0) >= 1, run)
        pid = first["pid"]
        assert pid != os.getpid() and b"ray::" in Path(f"/proc/{pid}/cmdline").read_bytes()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(pid)
        killed = _record(url, "osr")  # the last checkpoint before the kill
        assert not killed["done"], "the supernet finished before the kill: make its epochs longer"
        report = run.result(timeout=600)

    assert report.outcome == "done", report
    record = _record(url, "osr")
    assert record["done"] and record["epoch"] == EPOCHS
    # a restart resumed after the killed worker's last epoch (not from scratch) and trained the rest
    assert record["resumed_from"] == [killed["epoch"]] and killed["epoch"] >= 1
    assert record["pid"] != pid
    assert [r["epoch"] for r in record["curve"]] == list(range(1, EPOCHS + 1))
    assert record["curve"][: killed["epoch"]] == killed["curve"]  # the same records: not retrained
    assert study.user_attrs[PHASE_ATTR] == "done"
