"""The training recipe of a trial (SGD + momentum, cosine LR, label smoothing, AMP) and accuracy."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spsa_nas.config import TrainConfig

NONFINITE_CHECK_EVERY = 25  # steps between loss checks on a GPU (each check waits for the device)


class Cancelled(Exception):  # noqa: N818 - the contract's name (docs/CONTRACTS.md)
    """The trial was asked to stop (`should_stop()` returned True) while training."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial fails instead of reporting garbage."""


@dataclass
class TrainReport:
    """What a training run did: validation accuracy after each epoch, steps and wall time, and the
    final validation cross-entropy where the fit measured it (a one-shot candidate's)."""

    val_curve: list[float] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    val_loss: float | None = None


@dataclass(frozen=True)
class Precision:
    """The autocast dtype of a run (None: float32) and whether a gradient scaler is needed."""

    dtype: torch.dtype | None
    scaler: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[object]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def choose_precision(amp: str, device: torch.device) -> Precision:
    """auto: bf16 (or fp16 + GradScaler without bf16) on CUDA, float32 elsewhere; on: also bf16 on
    the CPU; off: float32."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return Precision(None, False)
    if amp not in ("auto", "on"):
        raise ValueError(f"train.amp {amp!r}: valid values are auto, on, off")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, False)
        return Precision(torch.float16, True)
    if device.type == "cpu":
        return Precision(torch.bfloat16, False)
    return Precision(torch.float16, False)  # mps


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up from base/warmup to base over `warmup_steps`, then cosine decay to 0."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum; weight decay on weight matrices/kernels only, not on norms and biases."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int,
                device: torch.device) -> DataLoader:
    """A DataLoader whose shuffling comes from its own generator seeded with `seed`."""
    length = len(dataset)  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle and length > batch_size,  # no 1-sample batch for BatchNorm
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def _batches(loader: DataLoader, device: torch.device, channels_last: bool
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        yield images, labels.to(device, non_blocking=True)


def evaluate_accuracy(model: nn.Module, dataset: Dataset, device: str | torch.device,
                      topk: Sequence[int] = (1, 5), batch_size: int = 256,
                      channels_last: bool = False, num_workers: int = 0) -> dict[int, float | None]:
    """Top-k accuracies (fractions) of `model` on `dataset`, keyed by k.

    A top-k with k >= the number of classes says nothing (it is always 1), so it is None.
    The model runs in eval mode on `device`; its training flags are restored afterwards.
    """
    return _evaluate(model, dataset, device, topk, batch_size, channels_last, num_workers, loss=False)[0]


def evaluate_loss_and_accuracy(model: nn.Module, dataset: Dataset, device: str | torch.device,
                               batch_size: int = 256) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) of `model` on `dataset`, in one pass (eval mode; the
    training flags are restored). The loss ranks one-shot candidates far better than the accuracy,
    which ties and saturates on shared weights (docs/search.md)."""
    accuracy, loss = _evaluate(model, dataset, device, (1,), batch_size, False, 0, loss=True)
    return float(accuracy[1] or 0.0), float(loss or 0.0)


def _evaluate(model: nn.Module, dataset: Dataset, device: str | torch.device, topk: Sequence[int],
              batch_size: int, channels_last: bool, num_workers: int, *, loss: bool
              ) -> tuple[dict[int, float | None], float | None]:
    """Top-k accuracies keyed by k (None for k >= classes) and, with `loss`, the mean cross-entropy
    (else None: the per-epoch validation of a training does not pay for it)."""
    dev = torch.device(device)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("evaluate_accuracy: the dataset is empty")
    modes = {module: module.training for module in model.modules()}
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0, num_workers=num_workers, device=dev)
    correct = dict.fromkeys(topk, 0)
    total = 0
    loss_sum = 0.0
    num_classes = 0
    model.eval()
    try:
        with torch.inference_mode():
            for images, labels in _batches(loader, dev, channels_last):
                logits = model(images).float()
                num_classes = logits.shape[1]
                if loss:
                    loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
                ranked = logits.topk(min(max(topk), num_classes), dim=1).indices
                hits = ranked == labels.unsqueeze(1)
                for k in topk:
                    correct[k] += int(hits[:, :k].any(dim=1).sum())
                total += labels.shape[0]
    finally:
        for module, training in modes.items():
            module.training = training
    return {k: (correct[k] / total if k < num_classes else None) for k in topk}, (
        loss_sum / total if loss else None)


def train_model(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    cfg: TrainConfig,
    device: str | torch.device,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainReport:
    """Train `model` (moved to `device`) for `cfg.epochs` epochs with the paper's recipe.

    SGD + momentum, weight decay, label-smoothed cross-entropy, per-step cosine LR with linear
    warm-up over `cfg.warmup_epochs`, AMP per `cfg.amp`, at most `cfg.max_steps_per_epoch` steps an
    epoch. After each epoch the top-1 validation accuracy is appended to the report and passed to
    `on_epoch(epoch, val_acc)` (1-based; whatever it raises propagates). `should_stop` is polled
    before every step: True raises `Cancelled`. A non-finite loss raises `NonFiniteLossError`.
    Seeds: the caller seeds the model's initialisation; shuffling uses `cfg.seed`.
    """
    dev = torch.device(device)
    if len(train_set) == 0 or len(val_set) == 0:  # type: ignore[arg-type]
        raise ValueError(f"training needs samples: train has {len(train_set)}, "  # type: ignore[arg-type]
                         f"val has {len(val_set)}")  # type: ignore[arg-type]
    torch.manual_seed(cfg.seed)  # dropout and any other global-RNG use during training
    loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed,
                         num_workers=cfg.num_workers, device=dev)
    steps_per_epoch = len(loader)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = steps_per_epoch * cfg.warmup_epochs

    model.to(dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    precision = choose_precision(cfg.amp, dev)
    scaler = torch.amp.GradScaler(dev.type) if precision.scaler else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    report = TrainReport()
    start = time.perf_counter()
    step = 0
    check_every = 1 if dev.type == "cpu" else NONFINITE_CHECK_EVERY
    finite: torch.Tensor | None = None
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for index, (images, labels) in enumerate(_batches(loader, dev, cfg.channels_last)):
            if index >= steps_per_epoch:
                break
            if should_stop is not None and should_stop():
                raise Cancelled(f"stopped at epoch {epoch}, step {index + 1}")
            lr = lr_at(step, total_steps, warmup_steps, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with precision.autocast(dev):
                loss = criterion(model(images), labels)
            ok = torch.isfinite(loss.detach())
            finite = ok if finite is None else finite & ok
            if (step + 1) % check_every == 0 or index + 1 == steps_per_epoch:
                if not bool(finite):  # one host sync per `check_every` steps on accelerators
                    raise NonFiniteLossError(
                        f"training loss became {loss.item()} by epoch {epoch}, step {index + 1} "
                        f"(lr {lr:.4g}); lower train.lr, raise train.warmup_epochs or set amp: off")
                finite = None
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
        val_acc = evaluate_accuracy(model, val_set, dev, topk=(1,), batch_size=max(cfg.batch_size, 256),
                                    channels_last=cfg.channels_last, num_workers=cfg.num_workers)[1]
        report.val_curve.append(float(val_acc or 0.0))
        report.epochs = epoch
        report.steps = step
        report.seconds = time.perf_counter() - start
        if on_epoch is not None:
            on_epoch(epoch, report.val_curve[-1])
    if cfg.channels_last:
        model.to(memory_format=torch.contiguous_format)
    return report
