"""Training and evaluating a detector: torchvision's losses under our recipe, COCO mAP on a split."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from spsa_nas.config import TrainConfig
from spsa_nas.detection.data import CocoDetection, collate
from spsa_nas.detection.metrics import coco_map, detections_of
from spsa_nas.train import Cancelled, NonFiniteLossError, TrainReport, choose_precision, lr_at, make_optimizer

__all__ = ["GRAD_CLIP", "evaluate_detector", "train_detector"]

#: Gradient-norm clip of detector training (from scratch, the RPN and box losses spike early on).
GRAD_CLIP = 10.0


def _loader(dataset: CocoDetection, batch_size: int, *, shuffle: bool, seed: int,
            num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                      drop_last=shuffle and len(dataset) > batch_size, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)


def evaluate_detector(model: nn.Module, dataset: CocoDetection, device: str | torch.device, *,
                      batch_size: int = 8, num_workers: int = 0) -> dict[str, float | None]:
    """COCO box AP/AP50/AP75/APs/APm/APl of `model` on `dataset` (and mask_* for Mask R-CNN).

    The model runs in eval mode; its training flags are restored afterwards.
    """
    if len(dataset) == 0:
        raise ValueError(f"evaluate_detector: {dataset.name} has no images")
    dev = torch.device(device)
    category_ids = [c["id"] for c in sorted(dataset.coco["categories"], key=lambda c: c["id"])]
    with_masks = getattr(model, "roi_heads", None) is not None and model.roi_heads.has_mask()
    boxes, masks = [], []
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.inference_mode():
            batches = _loader(dataset, batch_size, shuffle=False, seed=0, num_workers=num_workers)
            for images, targets in batches:
                outputs = model([image.to(dev) for image in images])
                for output, target in zip(outputs, targets, strict=True):
                    image_id = int(target["image_id"])
                    boxes.extend(detections_of(output, image_id, category_ids))
                    if with_masks:
                        masks.extend(detections_of(output, image_id, category_ids, masks=True))
    finally:
        for module, training in modes.items():
            module.training = training
    metrics = coco_map(dataset.coco, boxes, "bbox")
    if with_masks:
        metrics.update({f"mask_{k}": v for k, v in coco_map(dataset.coco, masks, "segm").items()})
    return metrics


def train_detector(model: nn.Module, train_set: CocoDetection, val_set: CocoDetection, cfg: TrainConfig,
                   device: str | torch.device, *, on_epoch: Callable[[int, float], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> TrainReport:
    """Train a torchvision detector for `cfg.epochs` epochs; the box AP on `val_set` after each.

    The classifiers' recipe where it applies: SGD + momentum, weight decay on kernels only, per-step
    cosine LR with linear warm-up, AMP per `cfg.amp`, at most `cfg.max_steps_per_epoch` steps an
    epoch; the loss is the sum of torchvision's losses (no label smoothing), and the gradient
    norm is clipped at GRAD_CLIP. `on_epoch(epoch, val_ap)`, `should_stop` (→ Cancelled) and a
    non-finite loss (→ NonFiniteLossError) behave as in spsa_nas.train.train_model.
    """
    dev = torch.device(device)
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(f"training needs images: train has {len(train_set)}, val has {len(val_set)}")
    torch.manual_seed(cfg.seed)
    loader = _loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, num_workers=cfg.num_workers)
    steps_per_epoch = len(loader)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total, warmup = steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.warmup_epochs
    model.to(dev)
    optimizer = make_optimizer(model, cfg)
    precision = choose_precision(cfg.amp, dev)
    scaler = torch.amp.GradScaler(dev.type) if precision.scaler else None
    report = TrainReport()
    start = time.perf_counter()
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for index, (images, targets) in enumerate(loader):
            if index >= steps_per_epoch:
                break
            if should_stop is not None and should_stop():
                raise Cancelled(f"stopped at epoch {epoch}, step {index + 1}")
            lr = lr_at(step, total, warmup, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = [image.to(dev, non_blocking=True) for image in images]
            targets = [{k: v.to(dev, non_blocking=True) for k, v in t.items()} for t in targets]
            with precision.autocast(dev):
                loss = sum(model(images, targets).values())
            if not bool(torch.isfinite(loss.detach())):
                raise NonFiniteLossError(f"detection loss became {loss.item()} at epoch {epoch}, step "
                                         f"{index + 1} (lr {lr:.4g}); lower train.lr or raise "
                                         "train.warmup_epochs")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                optimizer.step()
            step += 1
        val_ap = evaluate_detector(model, val_set, dev, batch_size=max(cfg.batch_size, 8),
                                   num_workers=cfg.num_workers)["ap"]
        report.val_curve.append(float(val_ap or 0.0))
        report.epochs = epoch
        report.steps = step
        report.seconds = time.perf_counter() - start
        if on_epoch is not None:
            on_epoch(epoch, report.val_curve[-1])
    return report
