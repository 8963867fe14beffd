"""The one-shot supernet: every channel attention of a stage as a branch, SPSA per sampled path, its
single-path training loop, path extraction into a standalone model, and BatchNorm recalibration.

A supernet has ONE backbone, width, stem and input size (a one-shot space fixes width: a space with
several widths gets one supernet per width, see workers/oneshot.py). Its weights are those of the
plain backbone plus, in every block, one branch per channel attention the stage may choose
(`<block>.attn.branches.<name>`). SPSA has no parameters, so switching it on or off, its heads and
its alpha share every weight: a path (an ArchSpec) picks per stage a channel-attention branch and
applies SPSA (with the path's heads, alpha, gate direction and similarity) in the spec's order.
The non-local and GC blocks, which have weights, are not branches of a supernet: a path with one
is refused (`Supernet.check_path`); a space offering them is searched standalone.
`path_state_dict` maps a path's weights onto the keys `spsa_nas.build_model(spec)` has
(`<block>.attn.channel.*` <- `<block>.attn.branches.<name>.*`), so a candidate evaluated from the
supernet is the standalone model the search hands out.

BatchNorm statistics are not shared meaningfully between paths (each path sees other activations):
`recalibrate_bn` recomputes them for one path from a few training batches before it is evaluated.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Dataset

from spsa_nas.config import TrainConfig
from spsa_nas.models import build_model
from spsa_nas.models._attn import BlockAttention, make_spsa, stage_attention
from spsa_nas.spec import ArchSpec, StageInfo, StageSpec
from spsa_nas.train import (
    Cancelled,
    NonFiniteLossError,
    evaluate_accuracy,
    evaluate_loss_and_accuracy,
    lr_at,
    make_loader,
    make_optimizer,
)

SAMPLINGS = ("uniform", "fair", "sandwich")  # how train_supernet picks the paths of a step

#: Draws one path (an ArchSpec of the supernet's backbone and width) from a random generator.
PathSampler = Callable[[random.Random], ArchSpec]


class MixedAttention(nn.Module):
    """One block's attention in the supernet: a branch per channel attention, SPSA on the path.

    `path` (a StageSpec, set by `Supernet.set_path`) chooses the branch (`none`: no branch), SPSA
    with its heads, alpha, gate direction and similarity, and the order, exactly as
    `spsa_nas.models.BlockAttention` does.
    """

    def __init__(self, channels: int, branches: dict[str, nn.Module]) -> None:
        super().__init__()
        self.channels = channels
        self.branches = nn.ModuleDict(branches)
        self.path: StageSpec | None = None

    def forward(self, x: Tensor) -> Tensor:
        stage = self.path
        if stage is None:
            raise RuntimeError("MixedAttention: no path set; call Supernet.set_path(spec) first")
        channel = None
        if stage.channel_attn != "none":
            if stage.channel_attn not in self.branches:
                raise ValueError(f"channel attention {stage.channel_attn!r} is not a branch of this "
                                 f"supernet stage; branches: none, {', '.join(self.branches)}")
            channel = self.branches[stage.channel_attn]
        spsa = make_spsa(self.channels, stage) if stage.spsa else None
        if channel is None and spsa is None:
            return x
        return BlockAttention(channel, spsa, stage.attn_order)(x)  # holds the branch, not a copy


def _stage_prefixes(info: StageInfo) -> list[str]:
    """Module-name prefixes of a stage's blocks: "layer1" -> [layer1]; "features.2-3" -> [.2, .3]."""
    head, sep, tail = info.name.rpartition(".")
    if sep and "-" in tail:
        first, last = (int(part) for part in tail.split("-"))
        return [f"{head}.{k}" for k in range(first, last + 1)]
    return [info.name]


def _stage_of(block: str, table: Sequence[StageInfo]) -> int:
    for index, info in enumerate(table):
        if any(block == p or block.startswith(p + ".") for p in _stage_prefixes(info)):
            return index
    raise ValueError(f"block {block!r} belongs to no stage of {[s.name for s in table]}")


class Supernet(nn.Module):
    """The weight-sharing supernet of one backbone and width (see the module docstring).

    `base`: backbone, width, stem, input size, classes and channels (its stages are ignored);
    `channel_attn[i]`: the channel attentions stage i may choose ("none" needs no branch).
    The backbone lives under `net` with `spsa_nas.build_model`'s names.
    """

    def __init__(self, base: ArchSpec, channel_attn: Sequence[Sequence[str]]) -> None:
        super().__init__()
        table = base.stage_info()
        if len(channel_attn) != len(table):
            raise ValueError(f"channel_attn: {base.backbone} has {len(table)} stages, got "
                             f"{len(channel_attn)} lists of choices")
        self.base = ArchSpec.plain(base.backbone, num_classes=base.num_classes,
                                   in_channels=base.in_channels, stem=base.stem,
                                   input_size=base.input_size, width=base.width)
        self.choices = tuple(tuple(names) for names in channel_attn)
        self.net = build_model(self.base, memory_efficient=False)
        self.blocks: list[tuple[str, int]] = []  # (block module name, stage index)
        for name, _ in list(self.net.named_modules()):
            if not name.endswith(".attn"):
                continue
            block = name[: -len(".attn")]
            index = _stage_of(block, table)
            branches = {}
            for choice in self.choices[index]:
                if choice == "none":
                    continue
                probe = self.base.model_copy(update={"stages": tuple(
                    StageSpec(channel_attn=choice) if i == index else s
                    for i, s in enumerate(self.base.stages))})
                attn = stage_attention(probe, index)(table[index].channels)  # the candidate's options
                branches[choice] = attn.channel
            self.net.get_submodule(block).attn = MixedAttention(table[index].channels, branches)
            self.blocks.append((block, index))

    def check_path(self, spec: ArchSpec) -> None:
        """ValueError naming the field when `spec` is not a path of this supernet."""
        for name in ("backbone", "width", "stem", "input_size", "num_classes", "in_channels"):
            if getattr(spec, name) != getattr(self.base, name):
                raise ValueError(f"{name}: the path has {getattr(spec, name)!r}, the supernet "
                                 f"{getattr(self.base, name)!r} (a supernet has one backbone and width)")
        for i, stage in enumerate(spec.stages):
            if stage.spatial_attn != "none":
                raise ValueError(f"stages.{i}.spatial_attn: strategy oneshot does not support spatial "
                                 f"attention {stage.spatial_attn!r} (its weights are not shared in "
                                 "the supernet); search this space with strategy standalone")
            if stage.channel_attn not in self.choices[i]:
                raise ValueError(f"stages.{i}.channel_attn: {stage.channel_attn!r} is not a choice of "
                                 f"this supernet's stage {i + 1}; choices: {', '.join(self.choices[i])}")

    def set_path(self, spec: ArchSpec) -> None:
        """Route every block through `spec`'s choices of its stage."""
        self.check_path(spec)
        for block, index in self.blocks:
            self.net.get_submodule(block).attn.path = spec.stages[index]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def drop_off_path_grads(self, paths: Sequence[ArchSpec]) -> None:
        """Set the gradients of the branches no path of the step used to None, so that the
        optimizer skips them (no weight decay, no momentum) — also under DDP, whose reducer may
        hand parameters unused in a step a zero gradient instead of none."""
        for block, index in self.blocks:
            chosen = {path.stages[index].channel_attn for path in paths}
            for name, branch in self.net.get_submodule(block).attn.branches.items():
                if name not in chosen:
                    for param in branch.parameters():
                        param.grad = None

    def fair_paths(self, path: ArchSpec, rng: random.Random) -> list[ArchSpec]:
        """FairNAS-style strict fairness: as many paths as the largest stage has channel-attention
        choices, built from `path`, in which every stage takes each of its choices equally often
        (a random permutation per stage; SPSA's choices, which have no weights, stay `path`'s)."""
        count = max(len(c) for c in self.choices)
        orders = [rng.sample(list(c), len(c)) for c in self.choices]
        return [path.model_copy(update={"stages": tuple(
            stage.model_copy(update={"channel_attn": orders[i][k % len(orders[i])]})
            for i, stage in enumerate(path.stages))}) for k in range(count)]

    def branch_parameters(self, stage: int) -> dict[str, int]:
        """The parameters each channel-attention choice of stage `stage` adds, over its blocks
        ("none": 0)."""
        sizes = {name: 0 for name in self.choices[stage]}
        for block, index in self.blocks:
            if index == stage:
                for name, branch in self.net.get_submodule(block).attn.branches.items():
                    sizes[name] += sum(p.numel() for p in branch.parameters())
        return sizes

    def path_state_dict(self, spec: ArchSpec) -> dict[str, Tensor]:
        """The weights of path `spec` under the keys of `build_model(spec)` (the supernet's own
        tensors, not copies: loading them into a candidate copies their values)."""
        self.check_path(spec)
        own = self.net.state_dict(keep_vars=True)
        stage_of = dict(self.blocks)
        out: dict[str, Tensor] = {}
        for key, value in own.items():
            block, marker, rest = key.partition(".attn.branches.")
            if not marker:
                out[key] = value
                continue
            choice, _, leaf = rest.partition(".")
            if spec.stages[stage_of[block]].channel_attn == choice:
                out[f"{block}.attn.channel.{leaf}"] = value
        return out

    def extract(self, spec: ArchSpec) -> nn.Module:
        """The standalone model of path `spec` (build_model) carrying this supernet's weights."""
        model = build_model(spec)
        weights = {k: v.detach() for k, v in self.path_state_dict(spec).items()}
        model.load_state_dict(weights, strict=True)
        return model


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of `model` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def recalibrate_bn(model: nn.Module, dataset: Dataset, device: str | torch.device, *, batches: int,
                   batch_size: int, seed: int = 0) -> int:
    """Recompute every BN's running mean/var of `model` as the plain average over `batches`
    training batches (momentum None: a cumulative average, not an exponential one). Weights are
    untouched; the model is left in eval mode. Returns the number of batches used."""
    if batches < 1:
        raise ValueError(f"recalibrate_bn: batches must be >= 1, got {batches}")
    dev = torch.device(device)
    norms = batchnorms(model)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    loader = make_loader(dataset, batch_size, shuffle=True, seed=seed, num_workers=0, device=dev)
    used = 0
    model.train()
    try:
        with torch.no_grad():
            for images, _ in loader:
                if used >= batches:
                    break
                model(images.to(dev))
                used += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return used


@dataclass
class SupernetEpoch:
    """One epoch of supernet training: mean loss, and validation accuracy of fixed probe paths."""

    epoch: int
    train_loss: float
    val_acc: float  # mean over the probe paths, each BN-recalibrated
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "train_loss": self.train_loss, "val_acc": self.val_acc,
                "seconds": self.seconds}


@dataclass
class SupernetRun:
    """How to train a supernet: its budget, sampling, probes and (for DDP) this worker's place."""

    train: TrainConfig
    epochs: int
    bn_batches: int = 8  # batches for each BN recalibration
    probe_paths: int = 2  # paths whose validation accuracy makes the training curve
    shards: int = 1  # BN batches per global batch: the DDP world size (single worker: micro-batches)
    sampling: str = "uniform"  # uniform: one path a step (SPOS); fair: FairNAS strict fairness;
    # sandwich: the `extremes` (largest, smallest) and `sandwich_paths` random paths a step (BigNAS)
    extremes: tuple[ArchSpec, ArchSpec] | None = None
    sandwich_paths: int = 2
    rank: int = 0  # with a DDP wrapper, the shard this worker computes
    curve: list[SupernetEpoch] = field(default_factory=list)


def path_rng(seed: int, step: int) -> random.Random:
    """The generator of the path of global step `step`: the same on every worker and on resume."""
    return random.Random(seed * 1_000_003 + step)


def probe_accuracy(supernet: Supernet, sampler: PathSampler, train_set: Dataset, val_set: Dataset,
                   run: SupernetRun, device: torch.device) -> float:
    """Mean validation accuracy of `run.probe_paths` fixed paths, each BN-recalibrated first."""
    accs = []
    for k in range(run.probe_paths):
        supernet.set_path(sampler(random.Random(-1 - k)))
        recalibrate_bn(supernet, train_set, device, batches=run.bn_batches,
                       batch_size=run.train.batch_size, seed=run.train.seed)
        accs.append(float(evaluate_accuracy(supernet, val_set, device, topk=(1,),
                                            batch_size=max(run.train.batch_size, 256))[1] or 0.0))
    return sum(accs) / len(accs)


def train_supernet(
    supernet: Supernet,
    sampler: PathSampler,
    train_set: Dataset,
    val_set: Dataset,
    run: SupernetRun,
    device: str | torch.device,
    *,
    wrapped: nn.Module | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[SupernetEpoch, Callable[[], dict[str, Any]]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    stop_after_epoch: Callable[[], bool] | None = None,
) -> list[SupernetEpoch]:
    """Single-path uniform training (SPOS): each step draws one path (`sampler` with
    `path_rng(seed, step)`), routes the supernet through it and takes one SGD step on it.
    `run.sampling == "fair"`: each step accumulates the gradients of `Supernet.fair_paths` (every
    channel-attention branch of every stage once, FairNAS's strict fairness) before its one step.
    `run.sampling == "sandwich"` (the sandwich rule of BigNAS / Once-for-All): each step accumulates
    the largest path, the smallest (`run.extremes`) and `run.sandwich_paths` sampled ones.

    The recipe is the trial's (SGD + momentum, weight decay, label smoothing, cosine LR with
    warm-up, `max_steps_per_epoch`), in float32. Epoch e's batches come from a loader seeded with
    train.seed + e, so a run resumed from a checkpoint (`resume`: what a checkpoint callable
    returned) continues exactly as an uninterrupted one. Each global batch is split into
    `run.shards` BN batches: a DDP worker (`wrapped` = its DistributedDataParallel around
    `supernet`) computes shard `run.rank` and DDP averages the gradients; a single worker computes
    every shard and averages their losses — the same gradients. After each epoch `on_epoch(record,
    checkpoint)` is called; `checkpoint()` returns the state to resume from. Then, before another
    epoch, `stop_after_epoch()` (a deadline) may end the training early: the curve so far is
    returned and the last checkpoint resumes it. Under DDP the workers stop together (any worker's
    True stops all). `should_stop()` (a cancel) is asked before every step and raises Cancelled.
    """
    if run.sampling not in SAMPLINGS:
        raise ValueError(f"sampling: {run.sampling!r} is not one of {', '.join(SAMPLINGS)}")
    if run.sampling == "sandwich":
        if run.extremes is None:
            raise ValueError("sampling sandwich needs run.extremes (the largest and the smallest path)")
        if run.sandwich_paths < 1:
            raise ValueError(f"sandwich_paths must be >= 1, got {run.sandwich_paths}")
        for path in run.extremes:
            supernet.check_path(path)
    dev = torch.device(device)
    cfg = run.train
    supernet.to(dev)
    forward = wrapped if wrapped is not None else supernet
    optimizer = make_optimizer(supernet, cfg)
    first_epoch = 1
    if resume is not None:
        supernet.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        run.curve = [SupernetEpoch(**record) for record in resume["curve"]]
        first_epoch = int(resume["epoch"]) + 1
    loader_len = len(make_loader(train_set, cfg.batch_size, shuffle=True, seed=0, num_workers=0,
                                 device=dev))
    steps_per_epoch = min(loader_len, cfg.max_steps_per_epoch or loader_len)
    total = steps_per_epoch * run.epochs
    warmup = steps_per_epoch * cfg.warmup_epochs
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    shards = range(run.shards) if wrapped is None else (run.rank,)
    for epoch in range(first_epoch, run.epochs + 1):
        start = time.perf_counter()
        loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch,
                             num_workers=cfg.num_workers, device=dev)
        supernet.train()
        losses = []
        for index, (images, labels) in enumerate(loader):
            if index >= steps_per_epoch:
                break
            if should_stop is not None and should_stop():
                raise Cancelled(f"supernet training stopped at epoch {epoch}, step {index + 1}")
            step = (epoch - 1) * steps_per_epoch + index
            rng = path_rng(cfg.seed, step)
            paths = [sampler(rng)]
            if run.sampling == "fair":
                paths = supernet.fair_paths(paths[0], rng)
            elif run.sampling == "sandwich":
                assert run.extremes is not None
                paths = [*run.extremes, *paths, *(sampler(rng) for _ in range(run.sandwich_paths - 1))]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, cfg.lr)
            optimizer.zero_grad(set_to_none=True)
            image_parts, label_parts = images.chunk(run.shards), labels.chunk(run.shards)
            if len(image_parts) != run.shards:
                raise ValueError(f"train.batch_size {cfg.batch_size} is too small to split into "
                                 f"{run.shards} shards")
            step_loss, parts = 0.0, len(shards) * len(paths)
            for path in paths:
                supernet.set_path(path)
                for shard in shards:
                    loss = criterion(forward(image_parts[shard].to(dev)), label_parts[shard].to(dev))
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(f"supernet loss became {loss.item()} at epoch {epoch}, "
                                                 f"step {index + 1}; lower train.lr")
                    (loss / parts).backward()
                    step_loss += float(loss.detach()) / parts
            supernet.drop_off_path_grads(paths)
            optimizer.step()
            losses.append(step_loss)
        mean_loss = sum(losses) / max(1, len(losses))
        if wrapped is not None and torch.distributed.is_initialized():  # every worker's shards
            summed = torch.tensor([mean_loss], dtype=torch.float64, device=dev)  # NCCL: on the GPU
            torch.distributed.all_reduce(summed)
            mean_loss = float(summed.item()) / torch.distributed.get_world_size()
        record = SupernetEpoch(epoch=epoch, train_loss=mean_loss,
                               val_acc=probe_accuracy(supernet, sampler, train_set, val_set, run, dev),
                               seconds=time.perf_counter() - start)
        run.curve.append(record)
        if on_epoch is not None:
            def checkpoint(epoch: int = epoch) -> dict[str, Any]:
                return {"epoch": epoch,  # copies: training goes on after the callback
                        "model": {k: v.detach().clone() for k, v in supernet.state_dict().items()},
                        "optimizer": copy.deepcopy(optimizer.state_dict()),
                        "curve": [r.to_dict() for r in run.curve]}

            on_epoch(record, checkpoint)
        if epoch < run.epochs and stop_after_epoch is not None and _agreed(stop_after_epoch(), wrapped):
            break
    return run.curve


def _agreed(flag: bool, wrapped: nn.Module | None) -> bool:
    """`flag`, or under DDP whether any worker's flag is True (every worker then agrees)."""
    if wrapped is None or not torch.distributed.is_initialized():
        return flag
    device = next(wrapped.parameters()).device  # NCCL reduces GPU tensors only
    summed = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(summed)
    return float(summed.item()) > 0


def evaluate_path(supernet: Supernet, spec: ArchSpec, train_set: Dataset, val_set: Dataset,
                  device: str | torch.device, *, bn_batches: int, batch_size: int,
                  seed: int = 0) -> tuple[nn.Module, float, float]:
    """The standalone model of `spec` with the supernet's weights, its BN recalibrated on
    `bn_batches` training batches, its validation accuracy and its validation cross-entropy."""
    model = supernet.extract(spec).to(device)
    recalibrate_bn(model, train_set, device, batches=bn_batches, batch_size=batch_size, seed=seed)
    acc, loss = evaluate_loss_and_accuracy(model, val_set, device, batch_size=max(batch_size, 256))
    return model, acc, loss


__all__ = [
    "SAMPLINGS",
    "MixedAttention",
    "PathSampler",
    "Supernet",
    "SupernetEpoch",
    "SupernetRun",
    "batchnorms",
    "evaluate_path",
    "path_rng",
    "probe_accuracy",
    "recalibrate_bn",
    "train_supernet",
]
