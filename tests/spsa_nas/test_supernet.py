"""Tests of spsa_nas.supernet: weight sharing, path extraction, BN recalibration, training and resume."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
from torch.utils.data import TensorDataset

from spsa_nas.config import DataConfig, TrainConfig
from spsa_nas.data import load_data
from spsa_nas.models import build_model
from spsa_nas.spec import ArchSpec, StageSpec
from spsa_nas.supernet import (
    Supernet,
    SupernetRun,
    batchnorms,
    recalibrate_bn,
    train_supernet,
)

BASE = ArchSpec.plain("resnet18", num_classes=4, in_channels=3, stem="cifar", input_size=8, width=0.125)
CHOICES = [["none", "se", "eca"]] * 4


def _path(*stages: StageSpec) -> ArchSpec:
    return BASE.model_copy(update={"stages": tuple(stages)})


MIXED = _path(StageSpec(spsa=True, spsa_heads=2, spsa_alpha=0.5, channel_attn="se"),
              StageSpec(channel_attn="eca"),
              StageSpec(spsa=True, channel_attn="eca", attn_order="spsa_first"),
              StageSpec())


def _sampler(rng: random.Random) -> ArchSpec:
    stages = [StageSpec(spsa=rng.random() < 0.5, spsa_alpha=rng.choice([0.5, 1.0, 2.0]),
                        channel_attn=rng.choice(["none", "se", "eca"])) for _ in range(4)]
    return _path(*stages)


@pytest.fixture(scope="module")
def data() -> tuple[TensorDataset, TensorDataset]:
    splits = load_data(DataConfig(name="synthetic", synthetic_samples=96, seed=1), 8, 3)
    return splits.train, splits.val  # type: ignore[return-value]


def test_path_weights_are_the_supernets_own_tensors() -> None:
    torch.manual_seed(0)
    supernet = Supernet(BASE, CHOICES)
    weights = supernet.path_state_dict(MIXED)
    own = dict(supernet.net.state_dict(keep_vars=True))
    assert set(weights) == set(build_model(MIXED).state_dict())
    assert weights["layer1.0.attn.channel.fc1.weight"] is own["layer1.0.attn.branches.se.fc1.weight"]
    assert weights["layer2.1.attn.channel.conv.weight"] is own["layer2.1.attn.branches.eca.conv.weight"]
    assert weights["conv1.weight"] is own["conv1.weight"]
    # the extracted standalone model carries the same values and computes what the supernet path does
    model = supernet.extract(MIXED).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    supernet.set_path(MIXED)
    supernet.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), supernet(x))


def test_spsa_choices_share_every_weight() -> None:
    supernet = Supernet(BASE, CHOICES)
    off = _path(*[StageSpec(channel_attn="se")] * 4)
    on = _path(*[StageSpec(spsa=True, spsa_heads=4, spsa_alpha=2.0, channel_attn="se")] * 4)
    a, b = supernet.path_state_dict(off), supernet.path_state_dict(on)
    assert a.keys() == b.keys() and all(a[k] is b[k] for k in a)
    # ... but the computation differs: SPSA acts on the path
    x = torch.randn(2, 3, 8, 8)
    supernet.eval()
    with torch.no_grad():
        supernet.set_path(off)
        y_off = supernet(x)
        supernet.set_path(on)
        y_on = supernet(x)
    assert not torch.allclose(y_off, y_on)


def test_a_path_outside_the_supernet_is_refused() -> None:
    supernet = Supernet(BASE, CHOICES)
    with pytest.raises(ValueError, match=r"stages\.1\.channel_attn: 'cbam'"):
        supernet.set_path(_path(StageSpec(), StageSpec(channel_attn="cbam"), StageSpec(), StageSpec()))
    with pytest.raises(ValueError, match="width"):
        supernet.set_path(MIXED.model_copy(update={"width": 0.25}))
    with pytest.raises(RuntimeError, match="no path set"):
        supernet(torch.randn(2, 3, 8, 8))


def test_bn_recalibration_sets_the_average_of_the_batch_statistics(
        data: tuple[TensorDataset, TensorDataset]) -> None:
    train, _ = data
    torch.manual_seed(0)
    model = build_model(MIXED)
    before = [bn.running_mean.clone() for bn in batchnorms(model)]
    used = recalibrate_bn(model, train, "cpu", batches=3, batch_size=16, seed=5)
    assert used == 3 and not model.training
    after = [bn.running_mean for bn in batchnorms(model)]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # the stem's BN: the plain mean of the 3 batches' per-channel means of conv1's output
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(5))
    means = []
    with torch.no_grad():
        for i, (images, _) in enumerate(loader):
            if i == 3:
                break
            means.append(model.conv1(images).mean(dim=(0, 2, 3)))
    torch.testing.assert_close(model.bn1.running_mean, torch.stack(means).mean(0), rtol=1e-4, atol=1e-5)
    assert model.bn1.momentum == 0.1  # restored


def _train(data: tuple[TensorDataset, TensorDataset], epochs: int, *, resume: dict | None = None,
           stop_after: int | None = None) -> tuple[Supernet, list[dict]]:
    train, val = data
    torch.manual_seed(0)
    supernet = Supernet(BASE, CHOICES)
    run = SupernetRun(train=TrainConfig(epochs=epochs, batch_size=16, lr=0.05, max_steps_per_epoch=3),
                      epochs=epochs, bn_batches=1, probe_paths=1)
    saved: list[dict] = []

    def on_epoch(record: object, checkpoint) -> None:
        saved.append(checkpoint())
        if stop_after is not None and len(saved) == stop_after:
            raise KeyboardInterrupt  # a worker killed after the epoch's checkpoint

    with contextlib.suppress(KeyboardInterrupt):
        train_supernet(supernet, _sampler, train, val, run, "cpu", resume=resume, on_epoch=on_epoch)
    return supernet, saved


def test_training_changes_the_shared_weights_and_resumes_exactly(
        data: tuple[TensorDataset, TensorDataset]) -> None:
    fresh = Supernet(BASE, CHOICES)
    whole, checkpoints = _train(data, 2)
    assert [c["epoch"] for c in checkpoints] == [1, 2]
    assert [r["epoch"] for r in checkpoints[-1]["curve"]] == [1, 2]
    assert not torch.equal(whole.net.conv1.weight, fresh.net.conv1.weight)
    # killed after epoch 1, resumed from its checkpoint (through a serialisation round trip)
    _, first = _train(data, 2, stop_after=1)
    assert len(first) == 1
    resumed, rest = _train(data, 2, resume=first[0])
    assert [c["epoch"] for c in rest] == [2]
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    def figures(curve: list[dict]) -> list[float]:
        return [r[key] for r in curve for key in ("train_loss", "val_acc")]

    assert figures(rest[-1]["curve"]) == pytest.approx(figures(checkpoints[-1]["curve"]))


def test_shards_split_the_batch_for_batchnorm_only(data: tuple[TensorDataset, TensorDataset]) -> None:
    """Two BN shards (what 2 DDP workers compute) train differently from one: BN statistics are
    per shard, so the single-worker reference for DDP must use the same shards."""
    train, val = data
    results = []
    for shards in (1, 2):
        torch.manual_seed(0)
        supernet = Supernet(BASE, CHOICES)
        run = SupernetRun(train=TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2), epochs=1,
                          bn_batches=1, probe_paths=1, shards=shards)
        train_supernet(supernet, _sampler, train, val, run, "cpu")
        results.append(supernet.net.conv1.weight.detach().clone())
    assert not torch.allclose(results[0], results[1])


def test_fair_paths_take_every_branch_once_per_stage(data: tuple[TensorDataset, TensorDataset]) -> None:
    supernet = Supernet(BASE, [["none", "se", "eca"], ["se"], ["none", "eca"], ["none", "se", "eca"]])
    paths = supernet.fair_paths(MIXED.model_copy(update={"stages": (MIXED.stages[0], StageSpec(
        channel_attn="se"), MIXED.stages[2], MIXED.stages[3])}), random.Random(3))
    assert len(paths) == 3
    assert sorted(p.stages[0].channel_attn for p in paths) == ["eca", "none", "se"]
    assert [p.stages[1].channel_attn for p in paths] == ["se"] * 3
    assert sorted(p.stages[2].channel_attn for p in paths)[:2] == ["eca", "none"]
    assert all(p.stages[0].spsa and p.stages[0].spsa_heads == 2 for p in paths)  # SPSA is the path's
    # one fair step gives every branch a gradient; a uniform step only the path's
    train, val = data
    for sampling, expect_all in (("fair", True), ("uniform", False)):
        torch.manual_seed(0)
        net = Supernet(BASE, CHOICES)
        before = {k: v.clone() for k, v in net.state_dict().items() if ".branches." in k}
        run = SupernetRun(train=TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=1, weight_decay=0),
                          epochs=1, bn_batches=1, probe_paths=1, sampling=sampling)
        train_supernet(net, _sampler, train, val, run, "cpu")
        moved = [not torch.equal(before[k], v) for k, v in net.state_dict().items() if k in before]
        assert all(moved) == expect_all


def test_spsa_switches_are_path_choices_sharing_every_weight() -> None:
    torch.manual_seed(0)
    supernet = Supernet(BASE, CHOICES).eval()
    paper = _path(*[StageSpec(spsa=True, channel_attn="se")] * 4)
    x = torch.randn(2, 3, 8, 8)
    outputs = []
    for stage in (StageSpec(spsa=True, channel_attn="se"),
                  StageSpec(spsa=True, spsa_reverse=False, channel_attn="se"),
                  StageSpec(spsa=True, spsa_similarity="cosine", channel_attn="se")):
        path = _path(*[stage] * 4)
        weights = supernet.path_state_dict(path)
        assert all(weights[k] is v for k, v in supernet.path_state_dict(paper).items())
        supernet.set_path(path)
        with torch.no_grad():
            got = supernet(x)
            torch.testing.assert_close(got, supernet.extract(path).eval()(x))  # the standalone model
        outputs.append(got)
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[0], outputs[2])


@pytest.mark.parametrize("choice", ["nonlocal", "gc"])
def test_a_path_with_a_non_local_or_gc_block_is_refused(choice: str) -> None:
    supernet = Supernet(BASE, CHOICES)
    path = _path(StageSpec(), StageSpec(spatial_attn=choice), StageSpec(), StageSpec())
    with pytest.raises(ValueError, match=rf"stages\.1\.spatial_attn: strategy oneshot does not support "
                                         rf"spatial attention '{choice}'"):
        supernet.set_path(path)


def test_stop_after_epoch_ends_training_at_an_epoch_boundary(
        data: tuple[TensorDataset, TensorDataset]) -> None:
    train, val = data
    for answer, epochs in ((True, [1]), (False, [1, 2, 3])):
        torch.manual_seed(0)
        supernet = Supernet(BASE, CHOICES)
        run = SupernetRun(train=TrainConfig(epochs=3, batch_size=16, max_steps_per_epoch=1), epochs=3,
                          bn_batches=1, probe_paths=1)
        saved: list[int] = []

        def on_epoch(record: object, checkpoint, saved: list[int] = saved) -> None:
            saved.append(checkpoint()["epoch"])

        curve = train_supernet(supernet, _sampler, train, val, run, "cpu", on_epoch=on_epoch,
                               stop_after_epoch=lambda answer=answer: answer)
        assert [r.epoch for r in curve] == epochs and saved == epochs  # each epoch run is checkpointed


LARGEST = _path(*[StageSpec(spsa=True, spsa_heads=2, channel_attn="se")] * 4)
SMALLEST = _path(*[StageSpec()] * 4)


def test_branch_parameters_order_the_choices() -> None:
    sizes = Supernet(BASE, CHOICES).branch_parameters(0)
    assert sizes["none"] == 0 < sizes["eca"] < sizes["se"]


def test_sandwich_steps_train_the_extremes_and_random_paths(
        data: tuple[TensorDataset, TensorDataset]) -> None:
    train, val = data
    seen: list[ArchSpec] = []
    torch.manual_seed(0)
    supernet = Supernet(BASE, CHOICES)
    original = supernet.set_path

    def spy(spec: ArchSpec) -> None:
        seen.append(spec)
        original(spec)

    supernet.set_path = spy  # type: ignore[method-assign]
    before = supernet.net.conv1.weight.detach().clone()
    run = SupernetRun(train=TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2), epochs=1,
                      bn_batches=1, probe_paths=1, sampling="sandwich", extremes=(LARGEST, SMALLEST),
                      sandwich_paths=2)
    curve = train_supernet(supernet, _sampler, train, val, run, "cpu")
    assert len(curve) == 1 and curve[0].train_loss > 0
    assert not torch.equal(before, supernet.net.conv1.weight)
    steps = [seen[k * 4:(k + 1) * 4] for k in range(2)]  # 2 steps of 4 paths (then the probe path)
    for paths in steps:
        assert paths[:2] == [LARGEST, SMALLEST]
        for path in paths[2:]:
            supernet.check_path(path)
    assert steps[0][2:] != steps[1][2:]
    with pytest.raises(ValueError, match=r"sampling sandwich needs run\.extremes"):
        train_supernet(supernet, _sampler, train, val, SupernetRun(
            train=run.train, epochs=1, sampling="sandwich"), "cpu")
    with pytest.raises(ValueError, match="sampling: 'spos' is not one of uniform, fair, sandwich"):
        train_supernet(supernet, _sampler, train, val,
                       SupernetRun(train=run.train, epochs=1, sampling="spos"), "cpu")
