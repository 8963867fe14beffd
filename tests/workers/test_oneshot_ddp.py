"""The supernet trained data-parallel by Ray Train (TorchTrainer, DDP over gloo, 2 CPU workers)
equals the single-worker training of the same global batches on a fixed seed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from search_spaces.config import OneshotConfig, SearchConfig
from search_spaces.keys import supernet_records
from search_spaces.loading import load_space
from search_spaces.storage import open_storage
from search_spaces.study import create_study
from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig
from workers.oneshot import (
    OneshotPhases,
    SupernetJob,
    load_checkpoint,
    train_one_supernet,
    train_supernet_ray,
)

pytestmark = pytest.mark.slow

TINY = {"name": "tiny", "backbone": "resnet18", "stem": "cifar", "input_size": 8, "width": 0.125,
        "all_stages": {"spsa": [False, True], "heads": [1, 2], "channel_attn": ["none", "se", "eca"]}}


@pytest.fixture(scope="module")
def ray_two_cpus() -> Iterator[None]:
    """A local Ray with the machine's 2 CPUs: one per DDP worker (Ray Train's controller takes none)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("another test's Ray is running in this process")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def _job(url: str, name: str, artifacts: Path) -> SupernetJob:
    cfg = SearchConfig(study_name=name, space=TINY, dataset=DataConfig(name="digits", train_subset=200),
                       train=TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=4, lr=0.05),
                       latency=LatencyConfig(repeats=3, warmup=1), device="cpu", strategy="oneshot",
                       oneshot=OneshotConfig(epochs=2, bn_batches=1))
    study = create_study(cfg, url)
    (job,) = OneshotPhases(study, cfg, load_space(TINY), url, str(artifacts)).jobs()
    return job


def _final_state(job: SupernetJob) -> dict:
    storage = open_storage(job.storage_url)
    try:
        study_id = storage.get_study_id_from_name(job.study_name)
        record = supernet_records(storage.get_study_user_attrs(study_id))[job.key]
    finally:
        storage.close()
    assert record["done"] and record["epoch"] == 2
    return load_checkpoint(job.artifact_dir, record["checkpoint"])


def test_ddp_two_cpu_workers_equal_one_worker(tmp_path: Path, ray_two_cpus: None) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    ddp = _job(url, "ddp", tmp_path / "artifacts")
    train_supernet_ray(ddp, workers=2, num_cpus=1)
    single = _job(url, "single", tmp_path / "artifacts")
    train_one_supernet(single, "cpu", shards=2)  # one process, the same 2 BN shards per batch

    a, b = _final_state(ddp), _final_state(single)
    assert a["curve"][0]["train_loss"] == pytest.approx(b["curve"][0]["train_loss"], rel=1e-4)
    params = [k for k in a["model"] if "running_" not in k and "num_batches" not in k]
    moved = 0
    for key in params:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5, msg=key)
        moved += int(not torch.equal(a["model"][key], torch.zeros_like(a["model"][key])))
    assert moved > len(params) // 2
    # and DDP really split the batch: one worker with ONE shard (BN over the whole batch) differs
    whole = _job(url, "whole", tmp_path / "artifacts")
    train_one_supernet(whole, "cpu", shards=1)
    c = _final_state(whole)
    assert not torch.allclose(a["model"]["net.conv1.weight"], c["model"]["net.conv1.weight"], atol=1e-5)
