"""One-shot ranking quality and cost: Kendall tau of supernet estimates against standalone accuracy.

N distinct architectures are drawn uniformly from a space at ONE width (a supernet has one width;
pinning it also keeps the width, which alone orders accuracies, from inflating tau). Each is
trained standalone from scratch with `--seeds` seeds (the trial's recipe, a fixed step budget);
its standalone accuracy is the mean over seeds. One supernet is trained (`--sampling`: uniform
single-path, fair or sandwich) and every architecture is evaluated on it (path weights, BN
recalibrated, validation accuracy). Reported as JSON:

- tau: Kendall's tau-b between one-shot and standalone accuracy, with a bootstrap 95 % interval
  over architectures; tau among the standalone top half; whether the one-shot winner is in the
  standalone top 3; the same for the one-shot validation loss (`kendall_tau_loss`: -loss, i.e.
  the candidates' oneshot_score exp(-loss), against standalone accuracy - what a oneshot search
  ranks by under `oneshot.estimate: loss`, the default);
- with `--supernets K`, each supernet's tau (accuracy and loss) and the tau between supernets;
  the estimates are then the mean over the K supernets;
- with `--split-stage I` (few-shot NAS, Zhao et al. 2021): each trained supernet is copied into
  one sub-supernet per channel-attention choice of stage I, each trained `--split-steps` more
  steps on the paths with that choice only (uniform among them); an architecture is evaluated on
  the sub-supernet of its choice there (less weight sharing between the paths that differ in
  stage I), and the cost counts the sub-supernets' steps;
- the task's spread (SD across architectures of the standalone mean) against its seed noise
  (pooled SD between seeds of the same architecture) and the seed-to-seed tau (the ranking's own
  reproducibility: a ceiling for any estimator's tau);
- cost at `--cost-candidates` candidates (default 100) from the times measured in this run:
  supernet training + that many evaluations + retraining `--retrain` of them, against that many
  standalone trainings (training and evaluation only; latency is measured the same way in both
  strategies and left out);
- os.getloadavg() before and after (the machine is shared: wall times move with its load).

The default task is the synthetic gratings problem with 32 classes (8 orientations x 4
frequencies, random phase, contrast, colour and pixel noise) at 16 px, 2240 training and 960
validation images, 140 SGD steps (2 epochs) per standalone training: digits saturates (about 0.98
after 3 epochs of `quick`) or stays near chance (1 epoch), so there its architectures differ by
less than seed noise; here orientation and frequency need spatial structure, the fixed step budget
keeps accuracies below the ceiling, and the large validation set keeps its binomial noise low
(measured: spread across architectures 1.8x the seed noise, seed-to-seed tau 0.71).

Reduced run (standalone part about 35 min on 2 cores shared with a load average of 9; the
supernet part then takes minutes with --reuse):
    .venv/bin/python benchmarks/bench_oneshot.py --archs 20 --seeds 2 --out runs/oneshot_280.json
    .venv/bin/python benchmarks/bench_oneshot.py --archs 20 --seeds 2 --supernet-steps 560 \
        --reuse runs/oneshot_280.json --out runs/oneshot_560.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from cli_args import count, emit_json, fraction, non_negative, positive
from ranking import kendall_tau as _tau
from ranking import seed_noise_sd, tau_interval

from search_spaces.config import OneshotConfig, SearchConfig
from search_spaces.loading import load_space
from service.searches.results import json_safe
from spsa_nas.config import DataConfig, TrainConfig
from spsa_nas.data import load_data
from spsa_nas.models import build_model
from spsa_nas.spec import ArchSpec
from spsa_nas.supernet import (
    PathSampler,
    Supernet,
    SupernetRun,
    evaluate_path,
    recalibrate_bn,
    train_supernet,
)
from spsa_nas.train import evaluate_loss_and_accuracy, train_model
from workers.oneshot import sandwich_extremes, supernet_bases, uniform_sampler


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="quick", help="built-in space or YAML (default quick)")
    p.add_argument("--width", type=positive, default=0.25, help="the one width (default 0.25)")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "digits"])
    p.add_argument("--samples", type=count(), default=4000, help="synthetic: images in all (default 4000)")
    p.add_argument("--classes", type=count(2), default=32, help="synthetic: classes (default 32)")
    p.add_argument("--train-subset", type=positive, default=None, help="training samples (fraction or count)")
    p.add_argument("--val-fraction", type=fraction, default=0.3,
                   help="validation share (default 0.3: a large validation set keeps its binomial noise low)")
    p.add_argument("--archs", type=count(2), default=20, help="distinct architectures (default 20)")
    p.add_argument("--seeds", type=count(), default=2, help="standalone seeds per architecture (default 2)")
    p.add_argument("--steps", type=count(), default=140, help="standalone SGD steps (default 140)")
    p.add_argument("--supernet-steps", type=count(), default=280,
                   help="supernet SGD steps (default 280: twice the standalone's, as oneshot.epochs)")
    p.add_argument("--batch-size", type=count(), default=32)
    p.add_argument("--lr", type=positive, default=0.05)
    p.add_argument("--supernet-lr", type=positive, default=None, help="the supernet's peak LR (default --lr)")
    p.add_argument("--supernet-label-smoothing", type=non_negative, default=None,
                   help="the supernet's label smoothing (default: the trial's, 0.1)")
    p.add_argument("--bn-batches", type=count(), default=8, help="BN recalibration batches (default 8)")
    p.add_argument("--finetune-steps", type=count(0), default=0,
                   help="before its evaluation, train each extracted path this many SGD steps (the "
                        "trial's recipe, --finetune-lr; then BN recalibrated); default 0: none")
    p.add_argument("--finetune-lr", type=positive, default=None,
                   help="the fine-tuning's peak LR (default --lr)")
    p.add_argument("--sampling", choices=["uniform", "fair", "sandwich"], default="uniform",
                   help="supernet paths per step: uniform (one, SPOS), fair (FairNAS: every branch once) "
                        "or sandwich (BigNAS: largest, smallest and --sandwich-paths random)")
    p.add_argument("--sandwich-paths", type=count(0), default=2,
                   help="sandwich: random paths per step (default 2)")
    p.add_argument("--supernets", type=count(), default=1,
                   help="supernets trained with seeds --seed, --seed+1, ...: an architecture's estimate "
                        "is the mean over them (default 1; each one's own tau and the tau between "
                        "them are reported too)")
    p.add_argument("--split-stage", type=count(0), default=None,
                   help="few-shot: one sub-supernet per channel-attention choice of this stage (0-based)")
    p.add_argument("--split-steps", type=count(), default=None,
                   help="few-shot: SGD steps of each sub-supernet after the copy "
                        "(default --supernet-steps / 2)")
    p.add_argument("--bootstrap", type=count(), default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--cost-candidates", type=count(), default=100)
    p.add_argument("--retrain", type=count(0), default=3, help="retrained finalists in the cost (default 3)")
    p.add_argument("--seed", type=int, default=0, help="draws the architectures and the supernet's paths")
    p.add_argument("--threads", type=count(), default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--reuse", type=Path, default=None,
                   help="take the standalone accuracies from this earlier output when its task, "
                        "standalone budget and architectures are this run's (one-shot part only)")
    return p.parse_args(argv)


def _budget(steps: int, loader_steps: int) -> tuple[int, int]:
    """(epochs, max_steps_per_epoch) giving about `steps` steps with epochs of whole loaders."""
    per_epoch = min(steps, loader_steps)
    return max(1, round(steps / per_epoch)), per_epoch


def _restricted(sample: PathSampler, stage: int, attn: str) -> PathSampler:
    """`sample` conditioned on stage `stage` having channel attention `attn`: rejection sampling,
    so the paths are uniform among those with that choice."""
    def draw(rng: random.Random) -> ArchSpec:
        while True:
            spec = sample(rng)
            if spec.stages[stage].channel_attn == attn:
                return spec
    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    data = DataConfig(name=args.dataset, synthetic_samples=args.samples, synthetic_classes=args.classes,
                      train_subset=args.train_subset, val_fraction=args.val_fraction, seed=0)
    space = load_space(args.space)
    space = load_space({**space.model_dump(mode="json", exclude_unset=True), "width": args.width})
    cfg = SearchConfig(space=args.space, dataset=data, strategy="oneshot",
                       oneshot=OneshotConfig(bn_batches=args.bn_batches))
    (base,) = supernet_bases(cfg, space)
    stage_choices = [list(s.choices.channel_attn) for s in space.stage_choices(base.backbone)]
    split_choices: list[str] = []
    if args.split_stage is not None:  # checked before anything is trained
        if args.split_stage >= len(stage_choices):
            raise SystemExit(f"--split-stage {args.split_stage}: the space has {len(stage_choices)} stages "
                             f"(0 to {len(stage_choices) - 1})")
        split_choices = stage_choices[args.split_stage]
    splits = load_data(data, base.input_size, base.in_channels)
    loader_steps = len(splits.train) // args.batch_size  # type: ignore[arg-type]
    epochs, per_epoch = _budget(args.steps, loader_steps)
    s_epochs, s_per_epoch = _budget(args.supernet_steps, loader_steps)

    sample = uniform_sampler(space, base)
    rng = random.Random(args.seed)
    archs: list[ArchSpec] = []
    while len(archs) < args.archs:
        spec = sample(rng)
        if spec not in archs:
            archs.append(spec)

    standalone: list[list[float]] = []
    standalone_s: list[float] = []
    task = {"dataset": args.dataset, "samples": args.samples if args.dataset == "synthetic" else None,
            "classes": args.classes if args.dataset == "synthetic" else 10,
            "train_images": len(splits.train), "val_images": len(splits.val),  # type: ignore[arg-type]
            "space": space.name, "width": args.width, "input_size": base.input_size}
    standalone_budget = {"standalone_steps": epochs * per_epoch,
                         "standalone_epochs": epochs * per_epoch / loader_steps,
                         "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds}
    specs_json = [s.model_dump(mode="json")["stages"] for s in archs]
    if args.reuse is not None:
        earlier = json.loads(args.reuse.read_text())
        if (earlier["task"] != task or earlier.get("standalone_budget") != standalone_budget
                or [p["spec"] for p in earlier["pairs"]] != specs_json):
            raise SystemExit(f"--reuse {args.reuse}: its task, standalone budget or architectures differ "
                             "from this run's")
        standalone = [p["standalone"] for p in earlier["pairs"]]
        standalone_s = [earlier["cost"]["standalone_s_per_training"]]
    for i, spec in enumerate(archs if not standalone else []):
        accs = []
        for seed in range(args.seeds):
            train = TrainConfig(epochs=epochs, max_steps_per_epoch=per_epoch, batch_size=args.batch_size,
                                lr=args.lr, seed=seed)
            torch.manual_seed(seed)
            model = build_model(spec)
            start = time.perf_counter()
            report = train_model(model, splits.train, splits.val, train, "cpu")
            standalone_s.append(time.perf_counter() - start)
            accs.append(report.val_curve[-1])
        standalone.append(accs)
        print(f"standalone {i + 1}/{len(archs)}: {[round(a, 4) for a in accs]}", file=sys.stderr)

    c_epochs, c_per_epoch = _budget(args.split_steps or max(1, args.supernet_steps // 2), loader_steps)
    supernet_s = 0.0
    per_supernet: list[list[float]] = []  # [supernet][arch] accuracy estimates
    per_supernet_loss: list[list[float]] = []  # [supernet][arch] validation cross-entropy
    eval_s: list[float] = []
    curves = []
    for k in range(args.supernets):
        seed = args.seed + k
        s_train = TrainConfig(epochs=s_epochs, max_steps_per_epoch=s_per_epoch, batch_size=args.batch_size,
                              lr=args.supernet_lr or args.lr, seed=seed,
                              **({} if args.supernet_label_smoothing is None
                                 else {"label_smoothing": args.supernet_label_smoothing}))
        torch.manual_seed(seed)
        supernet = Supernet(base, stage_choices)
        start = time.perf_counter()
        curve = train_supernet(supernet, sample, splits.train, splits.val,
                               SupernetRun(train=s_train, epochs=s_epochs, bn_batches=args.bn_batches,
                                           probe_paths=1, sampling=args.sampling,
                                           extremes=sandwich_extremes(space, base, supernet)
                                           if args.sampling == "sandwich" else None,
                                           sandwich_paths=args.sandwich_paths), "cpu")
        supernet_s += time.perf_counter() - start
        curves.append(curve)
        print(f"supernet {k}: curve {[round(r.val_acc, 3) for r in curve]}", file=sys.stderr)
        children: dict[str, Supernet] = {}
        for j, attn in enumerate(split_choices):
            child = copy.deepcopy(supernet)
            c_train = TrainConfig(epochs=c_epochs, max_steps_per_epoch=c_per_epoch,
                                  batch_size=args.batch_size, lr=s_train.lr, seed=1000 * (seed + 1) + j,
                                  label_smoothing=s_train.label_smoothing)
            start = time.perf_counter()
            c_run = SupernetRun(train=c_train, epochs=c_epochs, bn_batches=args.bn_batches, probe_paths=1)
            c_curve = train_supernet(child, _restricted(sample, args.split_stage, attn), splits.train,
                                     splits.val, c_run, "cpu")
            supernet_s += time.perf_counter() - start
            children[attn] = child
            print(f"supernet {k}, stage {args.split_stage} {attn}: curve "
                  f"{[round(r.val_acc, 3) for r in c_curve]}", file=sys.stderr)
        accs, losses = [], []
        for spec in archs:
            net = children[spec.stages[args.split_stage].channel_attn] if children else supernet
            start = time.perf_counter()
            if args.finetune_steps:
                model = net.extract(spec)
                train_model(model, splits.train, splits.val,
                            TrainConfig(epochs=1, max_steps_per_epoch=args.finetune_steps,
                                        batch_size=args.batch_size, lr=args.finetune_lr or args.lr,
                                        seed=seed), "cpu")
                recalibrate_bn(model, splits.train, "cpu", batches=args.bn_batches,
                               batch_size=args.batch_size, seed=seed)
                acc, loss = evaluate_loss_and_accuracy(model, splits.val, "cpu",
                                                       batch_size=max(args.batch_size, 256))
            else:
                _, acc, loss = evaluate_path(net, spec, splits.train, splits.val, "cpu",
                                             bn_batches=args.bn_batches, batch_size=args.batch_size,
                                             seed=seed)
            eval_s.append(time.perf_counter() - start)
            accs.append(acc)
            losses.append(loss)
        per_supernet.append(accs)
        per_supernet_loss.append(losses)
    oneshot = [statistics.fmean(col) for col in zip(*per_supernet, strict=True)]
    oneshot_loss = [statistics.fmean(col) for col in zip(*per_supernet_loss, strict=True)]

    means = [statistics.fmean(a) for a in standalone]
    tau = _tau(oneshot, means)
    neg_loss = [-v for v in oneshot_loss]
    tau_loss = _tau(neg_loss, means)
    loss_low, loss_high = tau_interval(neg_loss, means, args.bootstrap, args.seed)
    low, high = tau_interval(oneshot, means, args.bootstrap, args.seed)
    order = sorted(range(len(archs)), key=lambda i: -means[i])
    top = order[: len(archs) // 2]
    tau_top = _tau([oneshot[i] for i in top], [means[i] for i in top])
    winner = max(range(len(archs)), key=lambda i: oneshot[i])
    noise = seed_noise_sd(standalone)
    seed_tau = _tau([a[0] for a in standalone], [a[1] for a in standalone]) \
        if args.seeds > 1 else None
    n = args.cost_candidates
    passes = {"fair": max(len(c) for c in supernet.choices),  # paths a step
              "sandwich": 2 + args.sandwich_paths}.get(args.sampling, 1)
    # every candidate is evaluated on every supernet (as the wall time below counts it), each
    # evaluation fine-tuning its path --finetune-steps steps first
    one_epochs = (args.supernets * passes * s_epochs * s_per_epoch / loader_steps
                  + args.supernets * len(split_choices) * c_epochs * c_per_epoch / loader_steps
                  + n * args.supernets * args.finetune_steps / loader_steps
                  + args.retrain * epochs * per_epoch / loader_steps)
    alone_epochs = n * epochs * per_epoch / loader_steps
    mean_alone_s = statistics.fmean(standalone_s)
    one_wall = supernet_s + n * args.supernets * statistics.fmean(eval_s) + args.retrain * mean_alone_s
    result = {
        "benchmark": "oneshot",
        "task": task,
        "standalone_budget": standalone_budget,
        "budget": {"supernet_steps": s_epochs * s_per_epoch, "paths_per_step": passes,
                   "supernet_epochs": s_epochs * s_per_epoch / loader_steps,
                   "bn_batches": args.bn_batches, "sampling": args.sampling,
                   "finetune_steps": args.finetune_steps, "finetune_lr": args.finetune_lr or args.lr,
                   "lr": args.supernet_lr or args.lr, "label_smoothing": s_train.label_smoothing,
                   "sandwich_paths": args.sandwich_paths if args.sampling == "sandwich" else None,
                   "split_stage": args.split_stage,
                   "split_choices": split_choices or None,
                   "split_steps": c_epochs * c_per_epoch if split_choices else None},
        "standalone_reused_from": str(args.reuse) if args.reuse else None,
        "archs": len(archs),
        "kendall_tau": tau,
        "kendall_tau_ci95": [low, high],
        "kendall_tau_top_half": tau_top,
        "oneshot_winner_in_standalone_top3": winner in order[:3],
        "supernets": args.supernets,
        "kendall_tau_per_supernet": [_tau(e, means) for e in per_supernet],
        "tau_between_supernets": [_tau(per_supernet[i], per_supernet[j])
                                  for i in range(args.supernets) for j in range(i + 1, args.supernets)],
        "kendall_tau_loss": tau_loss,
        "kendall_tau_loss_per_supernet": [_tau([-v for v in e], means)
                                          for e in per_supernet_loss],
        "kendall_tau_loss_ci95": [loss_low, loss_high],
        "kendall_tau_loss_top_half": _tau([neg_loss[i] for i in top], [means[i] for i in top]),
        "oneshot_loss_winner_in_standalone_top3": max(range(len(archs)), key=lambda i: neg_loss[i])
        in order[:3],
        "standalone_spread_sd": statistics.stdev(means),
        "standalone_seed_noise_sd": noise,
        "spread_over_noise": statistics.stdev(means) / noise if noise else None,
        "seed_to_seed_tau": seed_tau,
        "standalone_range": [min(means), max(means)],
        "oneshot_range": [min(oneshot), max(oneshot)],
        "supernet_curve": [r.to_dict() for r in curves[0]],
        "supernet_curves": [[r.to_dict() for r in c] for c in curves],
        "cost": {
            "candidates": n, "retrained": args.retrain,
            "oneshot_train_epochs": one_epochs, "standalone_train_epochs": alone_epochs,
            "epochs_ratio": alone_epochs / one_epochs,
            "supernet_s": supernet_s, "eval_s_per_candidate": statistics.fmean(eval_s),
            "standalone_s_per_training": mean_alone_s,
            "oneshot_wall_s": one_wall, "standalone_wall_s": n * mean_alone_s,
            "wall_ratio": n * mean_alone_s / one_wall,
        },
        "pairs": [{"spec": s, "oneshot": o, "oneshot_loss": lo, "standalone": a}
                  for s, o, lo, a in zip(specs_json, oneshot, oneshot_loss, standalone, strict=True)],
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "torch_threads": args.threads,
    }
    emit_json(json_safe(result), args.out)
    return result


if __name__ == "__main__":
    main()
