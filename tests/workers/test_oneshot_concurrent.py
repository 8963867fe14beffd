"""The Ray coordinator's supernet phase: supernets of several widths train at once (up to the
parallelism), each record in its own study attr, a failure raised after the others finished, a
cancellation told to the workers; older studies' single supernet dict still read."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import optuna
import pytest

import workers.oneshot as oneshot
from search_spaces.config import OneshotConfig, SearchConfig
from search_spaces.keys import PHASE_ATTR, SUPERNET_ATTR, run_cancel_attr, supernet_attr, supernet_records
from search_spaces.loading import load_space
from search_spaces.storage import open_storage
from search_spaces.study import create_study
from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig
from workers.oneshot import OneshotPhases, SupernetJob

TWO_WIDTHS = {"name": "two", "backbone": "resnet18", "stem": "cifar", "input_size": 8, "width": [0.125, 0.25],
              "all_stages": {"spsa": [False, True], "heads": [1, 2], "channel_attn": ["none", "se"]}}
WAIT_S = 60.0  # how long a fake training waits for the other: only a sequential phase runs into it


def _phases(tmp_path: Path, parallelism: int, workers: int = 1) -> OneshotPhases:
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = DataConfig(name="digits", train_subset=100)
    cfg = SearchConfig(study_name="conc", space=TWO_WIDTHS, dataset=data,
                       trials=2, train=TrainConfig(epochs=1, batch_size=16), device="cpu",
                       latency=LatencyConfig(repeats=3, warmup=1), strategy="oneshot", retrain_top_k=0,
                       parallelism=parallelism, oneshot=OneshotConfig(epochs=1, workers=workers))
    study = create_study(cfg, url)
    return OneshotPhases(study, cfg, load_space(TWO_WIDTHS), url, str(tmp_path / "artifacts"))


def _store_done(job: SupernetJob) -> None:
    """What a finished training leaves: its record, done, in its own attr (from its own connection,
    as a worker process would)."""
    storage = open_storage(job.storage_url)
    try:
        study = optuna.load_study(study_name=job.study_name, storage=storage)
        study.set_user_attr(supernet_attr(job.key), {"epoch": 1, "epochs": 1, "done": True, "curve": [],
                                                     "checkpoint": f"ckpt-{job.key}"})
    finally:
        storage.close()


def test_supernets_of_two_widths_train_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    phases = _phases(tmp_path, parallelism=2)
    together = threading.Barrier(2)
    calls: list[tuple[str, float, float]] = []

    def fake(job: SupernetJob, *, num_cpus: float, num_gpus: float) -> None:
        calls.append((job.key, num_cpus, num_gpus))
        together.wait(timeout=WAIT_S)  # passes only when the other width's training runs too
        _store_done(job)

    monkeypatch.setattr(oneshot, "train_supernet_task", fake)
    assert phases.train_supernets_ray(run_id="r1", should_cancel=None, poll_s=0.05)
    assert sorted(key for key, _, _ in calls) == ["resnet18@w0.125", "resnet18@w0.25"]
    assert all(cpus == phases.cfg.resources.num_cpus for _, cpus, _ in calls)
    records = supernet_records(phases.study.user_attrs)
    assert sorted(records) == ["resnet18@w0.125", "resnet18@w0.25"]
    assert all(r["done"] for r in records.values())
    assert phases.study.user_attrs[PHASE_ATTR] == "candidates"


def test_parallelism_bounds_the_supernets_training_at_once(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    phases = _phases(tmp_path, parallelism=1)
    active: list[str] = []
    most = [0]
    lock = threading.Lock()

    def fake(job: SupernetJob, *, num_cpus: float, num_gpus: float) -> None:
        with lock:
            active.append(job.key)
            most[0] = max(most[0], len(active))
        _store_done(job)
        with lock:
            active.remove(job.key)

    monkeypatch.setattr(oneshot, "train_supernet_task", fake)
    assert phases.train_supernets_ray(run_id="r1", should_cancel=None, poll_s=0.05)
    assert most[0] == 1 and len(supernet_records(phases.study.user_attrs)) == 2


def test_several_workers_per_supernet_go_to_ray_train(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    phases = _phases(tmp_path, parallelism=4, workers=2)  # 4 // 2: both supernets at once
    together = threading.Barrier(2)
    seen: list[tuple[str, int]] = []

    def ddp(job: SupernetJob, *, workers: int, num_cpus: float, num_gpus: float) -> None:
        seen.append((job.key, workers))
        together.wait(timeout=WAIT_S)
        _store_done(job)

    def task(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("oneshot.workers 2 must train with Ray Train, not a single-worker task")

    monkeypatch.setattr(oneshot, "train_supernet_ray", ddp)
    monkeypatch.setattr(oneshot, "train_supernet_task", task)
    assert phases.train_supernets_ray(run_id="r1", should_cancel=None, poll_s=0.05)
    assert sorted(seen) == [("resnet18@w0.125", 2), ("resnet18@w0.25", 2)]


def test_a_failed_supernet_is_raised_after_the_other_finished(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    phases = _phases(tmp_path, parallelism=2)
    failed = threading.Event()
    started = threading.Barrier(2)

    def fake(job: SupernetJob, *, num_cpus: float, num_gpus: float) -> None:
        started.wait(timeout=WAIT_S)
        if job.key.endswith("0.125"):
            failed.set()
            raise MemoryError("worker killed past its retries")
        assert failed.wait(WAIT_S)  # still training when the other failed
        _store_done(job)

    monkeypatch.setattr(oneshot, "train_supernet_task", fake)
    with pytest.raises(RuntimeError, match=r"supernet resnet18@w0\.125 training failed: worker killed"):
        phases.train_supernets_ray(run_id="r1", should_cancel=None, poll_s=0.05)
    records = supernet_records(phases.study.user_attrs)
    assert list(records) == ["resnet18@w0.25"] and records["resnet18@w0.25"]["done"]  # its work kept
    assert phases.study.user_attrs[PHASE_ATTR] == "supernet"


def test_a_cancel_is_told_to_the_supernet_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    phases = _phases(tmp_path, parallelism=2)
    started = threading.Barrier(3)  # both trainings and the test

    def fake(job: SupernetJob, *, num_cpus: float, num_gpus: float) -> None:
        started.wait(timeout=WAIT_S)
        storage = open_storage(job.storage_url)  # a worker polls the run's cancel attr
        try:
            study_id = storage.get_study_id_from_name(job.study_name)
            while not storage.get_study_user_attrs(study_id).get(job.cancel_attr or ""):
                threading.Event().wait(0.02)
        finally:
            storage.close()

    monkeypatch.setattr(oneshot, "train_supernet_task", fake)
    cancel = threading.Event()
    result: list[bool] = []
    runner = threading.Thread(target=lambda: result.append(phases.train_supernets_ray(
        run_id="r1", should_cancel=cancel.is_set, poll_s=0.05)))
    runner.start()
    started.wait(timeout=WAIT_S)
    cancel.set()
    runner.join(WAIT_S)
    assert result == [False]
    assert phases.study.user_attrs[run_cancel_attr("r1")] is True
    assert supernet_records(phases.study.user_attrs) == {}


def test_older_studies_single_supernet_dict_is_still_read(tmp_path: Path) -> None:
    phases = _phases(tmp_path, parallelism=2)
    old = {"epoch": 1, "epochs": 1, "done": True, "checkpoint": "a", "curve": []}
    older = {"resnet18@w0.125": old, "resnet18@w0.25": {**old, "done": False}}
    phases.study.set_user_attr(SUPERNET_ATTR, older)
    assert not phases.supernets_done()
    phases.study.set_user_attr(supernet_attr("resnet18@w0.25"), {**old, "checkpoint": "b"})  # resumed since
    records = supernet_records(phases.study.user_attrs)
    assert records["resnet18@w0.25"]["checkpoint"] == "b" and records["resnet18@w0.125"] == old
    assert phases.supernets_done()
    with pytest.raises(ValueError, match="non-empty"):
        supernet_attr("")
