"""The `oneshot` strategy's phases: supernet training (in-process, or data-parallel with Ray Train),
candidate evaluation on the supernet's weights, and the standalone retraining of the finalists.

Phases, recorded in the study's user attr `spsa_nas:phase` (the API's progress shows it):
  supernet   - one supernet per (backbone, width) of the space trains (oneshot.sampling: uniform
               single-path, fair or sandwich); each epoch's checkpoint is a study artifact
               (its record, the study attr `spsa_nas:supernet:<key>`, holds its id, the epoch, the
               training curve, the epochs each restart resumed after and the pid of the worker
               that stored it), so a killed run resumes from the last one (on Ray, a killed worker
               is restarted: its task retried, or Ray Train's worker group restarted, and resumes);
               on Ray the supernets of several widths train at once, up to the parallelism;
               past the search's timeout_s training stops after the epoch in progress and the run
               ends "timeout" in this phase (no candidate on a partial supernet);
  candidates - the study's trials: each asks an architecture as a standalone trial does, is built
               standalone (latency measured exactly as a standalone trial's), takes its path's
               supernet weights, recalibrates BatchNorm, and is validated and tested (user attr
               `oneshot_estimate`: its accuracies are estimates);
  retrain    - the `retrain_top_k` best Pareto candidates are enqueued again and trained from
               scratch as standalone trials (user attr `retrain_of`: the candidate's number);
  done.
"""

from __future__ import annotations

import functools
import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.trial import FrozenTrial, TrialState

from search_spaces.config import SearchConfig
from search_spaces.keys import (
    ESTIMATE_ATTR,
    PHASE_ATTR,
    RETRAIN_ATTR,
    RETRAIN_OF_ATTR,
    run_cancel_attr,
    supernet_attr,
    supernet_records,
)
from search_spaces.space import AlphaRange, SearchSpace
from search_spaces.storage import open_storage
from search_spaces.study import pareto_front, ranked_accuracy
from search_spaces.suggest import resolve_io
from spsa_nas.data import Splits, dataset_in_channels, dataset_num_classes, load_data
from spsa_nas.evaluate import EvalHooks
from spsa_nas.latency import resolve_device
from spsa_nas.spec import ArchSpec, StageSpec
from spsa_nas.supernet import (
    PathSampler,
    Supernet,
    SupernetEpoch,
    SupernetRun,
    recalibrate_bn,
    train_supernet,
)
from spsa_nas.train import TrainReport, evaluate_loss_and_accuracy
from workers.ray_device import task_device
from workers.trial import run_trial

PHASES = ("supernet", "candidates", "retrain", "done")
CANCEL_CHECK_S = 2.0  # how often a supernet worker reads the study for a cancel
MAX_FAILURES = 3  # restarts of a supernet's workers (Ray task retries or Ray Train restarts; each
# resumes from the last checkpoint)


def supernet_key(backbone: str, width: float) -> str:
    """The name of the supernet of one backbone and width ("resnet18@w0.5")."""
    return f"{backbone}@w{width:g}"


def uniform_sampler(space: SearchSpace, base: ArchSpec) -> PathSampler:
    """Draws paths of `space` at `base`'s backbone and width uniformly, choice by choice, with the
    same structure as suggest_arch (heads, alpha, order, reverse and similarity only where SPSA is
    on; a continuous alpha range uniformly, log-uniformly when it says log, on its grid when it has
    a step)."""
    stages = [stage.choices for stage in space.stage_choices(base.backbone)]

    def alpha(rng: random.Random, choices: Any) -> float:
        if not isinstance(choices, AlphaRange):
            return float(rng.choice(list(choices)))
        grid = choices.values()
        if grid is not None:
            return float(rng.choice(grid))
        if choices.log:
            return math.exp(rng.uniform(math.log(choices.low), math.log(choices.high)))
        return rng.uniform(choices.low, choices.high)

    def sample(rng: random.Random) -> ArchSpec:
        specs = []
        for c in stages:
            spsa = rng.choice(c.spsa)
            attn = rng.choice(c.channel_attn)
            if not spsa:
                specs.append(StageSpec(channel_attn=attn))
                continue
            order = rng.choice(c.attn_order) if attn != "none" else "channel_first"
            heads, gate = rng.choice(c.heads), alpha(rng, c.alpha)
            # SPSA's switches are drawn only where the space offers several values, so that the
            # random sequence (and with it a resumed supernet's paths) of older spaces is unchanged
            reverse = rng.choice(c.spsa_reverse) if len(c.spsa_reverse) > 1 else c.spsa_reverse[0]
            similarity = (rng.choice(c.spsa_similarity) if len(c.spsa_similarity) > 1
                          else c.spsa_similarity[0])
            specs.append(StageSpec(spsa=True, spsa_heads=heads, spsa_alpha=gate, channel_attn=attn,
                                   attn_order=order, spsa_reverse=reverse,  # type: ignore[arg-type]
                                   spsa_similarity=similarity))
        return base.model_copy(update={"stages": tuple(specs)})

    return sample


def _middle_alpha(choices: Any) -> float:
    """A fixed alpha of a stage's choices: the middle of a list or grid, the (geometric when log)
    centre of a range."""
    if not isinstance(choices, AlphaRange):
        values = sorted(choices)
        return float(values[len(values) // 2])
    grid = choices.values()
    if grid is not None:
        return float(grid[len(grid) // 2])
    if choices.log:
        return math.sqrt(choices.low * choices.high)
    return (choices.low + choices.high) / 2


def sandwich_extremes(space: SearchSpace, base: ArchSpec, supernet: Supernet) -> tuple[ArchSpec, ArchSpec]:
    """The sandwich rule's two fixed paths of `space` at `base`'s backbone and width. Largest: every
    stage its channel attention with the most parameters in `supernet` and SPSA on (where the stage
    may switch it on) with its most heads, the middle alpha, and the stage's first order, gate
    direction and similarity. Smallest: every stage without channel attention (its lightest where
    "none" is not a choice) and SPSA off (where it may be off; else with its fewest heads)."""
    largest: list[StageSpec] = []
    smallest: list[StageSpec] = []
    for index, stage in enumerate(space.stage_choices(base.backbone)):
        c = stage.choices
        sizes = supernet.branch_parameters(index)
        order = list(c.channel_attn)  # ties: the space's first
        heavy = max(order, key=lambda name: (sizes[name], -order.index(name)))
        light = min(order, key=lambda name: (sizes[name], order.index(name)))

        for out, attn, spsa, heads in ((largest, heavy, True in c.spsa, max(c.heads)),
                                       (smallest, light, False not in c.spsa, min(c.heads))):
            out.append(StageSpec(channel_attn=attn) if not spsa else StageSpec(
                spsa=True, spsa_heads=heads, spsa_alpha=_middle_alpha(c.alpha), channel_attn=attn,
                attn_order=c.attn_order[0] if attn != "none" else "channel_first",  # type: ignore[arg-type]
                spsa_reverse=c.spsa_reverse[0], spsa_similarity=c.spsa_similarity[0]))  # type: ignore[arg-type]
    return (base.model_copy(update={"stages": tuple(largest)}),
            base.model_copy(update={"stages": tuple(smallest)}))


@dataclass(frozen=True)
class SupernetJob:
    """Everything one supernet's training needs, picklable for Ray Train workers."""

    storage_url: str
    study_name: str
    artifact_dir: str
    cfg: SearchConfig
    space: SearchSpace
    base: ArchSpec  # backbone, width, stem, input size, classes, channels of the supernet
    cancel_attr: str | None = None  # the study attr a coordinator sets to stop the run
    deadline: float | None = None  # wall-clock time (time.time()) of the search's timeout_s

    @property
    def key(self) -> str:
        return supernet_key(self.base.backbone, self.base.width)

    def choices(self) -> list[list[str]]:
        return supernet_choices(self.space, self.base)

    def build(self) -> Supernet:
        return build_supernet(self.cfg, self.space, self.base)

    def splits(self) -> Splits:
        return supernet_splits(self.cfg, self.base)


def supernet_choices(space: SearchSpace, base: ArchSpec) -> list[list[str]]:
    """Each stage's channel-attention choices: the supernet's branches."""
    return [list(s.choices.channel_attn) for s in space.stage_choices(base.backbone)]


def build_supernet(cfg: SearchConfig, space: SearchSpace, base: ArchSpec) -> Supernet:
    """The untrained supernet of `base`, seeded by `cfg.train.seed` (the same initial weights on
    every worker and every run)."""
    torch.manual_seed(cfg.train.seed)
    return Supernet(base, supernet_choices(space, base))


def supernet_splits(cfg: SearchConfig, base: ArchSpec) -> Splits:
    """The data a supernet of `base` trains and is validated on."""
    return load_data(cfg.dataset, cfg.train.image_size or base.input_size, base.in_channels)


def supernet_run(cfg: SearchConfig, space: SearchSpace, base: ArchSpec, supernet: Supernet, *,
                 shards: int = 1, rank: int = 0) -> SupernetRun:
    """The training settings of the supernet of `base` from the search config's `oneshot` section."""
    sampling = cfg.oneshot.sampling
    return SupernetRun(train=cfg.train, epochs=cfg.oneshot.supernet_epochs(cfg.train),
                       bn_batches=cfg.oneshot.bn_batches, shards=shards, rank=rank, sampling=sampling,
                       extremes=sandwich_extremes(space, base, supernet) if sampling == "sandwich" else None,
                       sandwich_paths=cfg.oneshot.sandwich_paths)


def supernet_bases(cfg: SearchConfig, space: SearchSpace) -> list[ArchSpec]:
    """One base spec per (backbone, width) of the space: a supernet each (a supernet has one width)."""
    classes, channels = resolve_io(
        space, num_classes=dataset_num_classes(cfg.dataset) if space.num_classes is None else None,
        in_channels=dataset_in_channels(cfg.dataset) if space.in_channels is None else None)
    return [ArchSpec.plain(backbone, num_classes=classes, in_channels=channels, stem=space.stem,
                           input_size=space.input_size, width=width)  # type: ignore[arg-type]
            for backbone in space.backbones for width in space.widths]


def _record(study: optuna.Study, key: str) -> dict[str, Any]:
    return supernet_records(study.user_attrs).get(key) or {}


def _set_record(study: optuna.Study, key: str, record: dict[str, Any]) -> None:
    """Store the record of the supernet `key` in its own study attr: supernets training at once
    (each in its own process) never read-modify-write a shared one."""
    study.set_user_attr(supernet_attr(key), record)


def load_checkpoint(artifact_dir: str, artifact_id: str) -> dict[str, Any]:
    """A supernet checkpoint (what train_supernet's checkpoint() returned, plus base and choices)."""
    with tempfile.TemporaryDirectory(prefix="spsa-nas-") as tmp:
        path = Path(tmp) / "supernet.pt"
        download_artifact(artifact_store=FileSystemArtifactStore(artifact_dir), file_path=str(path),
                          artifact_id=artifact_id)
        return torch.load(path, map_location="cpu", weights_only=True)


def train_one_supernet(job: SupernetJob, device: str | torch.device, *, shards: int = 1, rank: int = 0,
                       wrapped: torch.nn.Module | None = None, supernet: Supernet | None = None,
                       should_stop: Callable[[], bool] | None = None) -> list[SupernetEpoch]:
    """Train (or resume) the supernet of `job` to its epochs. Each global batch is `shards` BN
    batches: a DDP worker (`wrapped`) computes shard `rank`, a single worker all of them (what
    `shards` DDP workers compute together). Rank 0 stores each epoch's checkpoint as a study
    artifact and the curve in the record `spsa_nas:supernet:<key>`. Past `job.deadline` the
    training stops after the epoch in progress (its checkpoint stored; the record stays not
    `done`)."""
    device = resolve_device(device)
    Path(job.artifact_dir).mkdir(parents=True, exist_ok=True)
    storage = open_storage(job.storage_url)
    try:
        study = optuna.load_study(study_name=job.study_name, storage=storage)
        record = _record(study, job.key)
        epochs = job.cfg.oneshot.supernet_epochs(job.cfg.train)
        if record.get("done"):
            return [SupernetEpoch(**r) for r in record.get("curve", [])]
        supernet = supernet or job.build()
        resume = None
        resumed_from = list(record.get("resumed_from") or [])
        if record.get("checkpoint"):
            resume = load_checkpoint(job.artifact_dir, record["checkpoint"])
            resumed_from.append(int(resume["epoch"]))  # the epoch this (re)start continues after
        splits = job.splits()
        run = supernet_run(job.cfg, job.space, job.base, supernet, shards=shards, rank=rank)

        def on_epoch(epoch: SupernetEpoch, checkpoint: Callable[[], dict[str, Any]]) -> None:
            if rank != 0:
                return
            state = checkpoint()
            state["base"] = job.base.model_dump_json()
            state["choices"] = job.choices()
            with tempfile.TemporaryDirectory(prefix="spsa-nas-") as tmp:
                path = Path(tmp) / f"supernet-{job.key}-epoch{epoch.epoch}.pt"
                torch.save(state, path)
                artifact = upload_artifact(artifact_store=FileSystemArtifactStore(job.artifact_dir),
                                           file_path=str(path), study_or_trial=study,
                                           mimetype="application/octet-stream")
            _set_record(study, job.key, {"epoch": epoch.epoch, "epochs": epochs, "checkpoint": artifact,
                                         "curve": state["curve"], "done": epoch.epoch >= epochs,
                                         "workers": shards if wrapped is not None else 1,
                                         "resumed_from": resumed_from, "pid": os.getpid()})

        deadline = job.deadline
        past_deadline = None if deadline is None else (lambda: time.time() >= deadline)
        curve = train_supernet(supernet, uniform_sampler(job.space, job.base), splits.train, splits.val, run,
                               device, wrapped=wrapped, resume=resume, on_epoch=on_epoch,
                               should_stop=should_stop, stop_after_epoch=past_deadline)
        trained = bool(curve) and curve[-1].epoch >= epochs  # not when the deadline stopped it
        if rank == 0 and trained and not _record(study, job.key).get("done"):  # resumed at its last epoch
            _set_record(study, job.key, {**_record(study, job.key), "done": True})
        return curve
    finally:
        storage.close()


def _cancel_poll(job: SupernetJob) -> Callable[[], bool] | None:
    """should_stop for a supernet worker: True once the coordinator set the run's cancel attr."""
    if job.cancel_attr is None:
        return None
    storage = open_storage(job.storage_url)
    study_id = storage.get_study_id_from_name(job.study_name)
    last = [0.0, False]

    def should_stop() -> bool:
        now = time.monotonic()
        if now - last[0] >= CANCEL_CHECK_S:
            last[0] = now
            last[1] = bool(storage.get_study_user_attrs(study_id).get(job.cancel_attr))
        return bool(last[1])

    return should_stop


def _ddp_worker(config: dict[str, Any]) -> None:
    """Ray Train's loop per worker: DDP (gloo on CPU, NCCL on GPU) over the supernet."""
    import ray.train
    import ray.train.torch

    job: SupernetJob = config["job"]
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    supernet = job.build()
    device = ray.train.torch.get_device()
    wrapped = None
    if world > 1:  # one path per step: the other branches get no gradient that step
        wrapped = ray.train.torch.prepare_model(
            supernet, parallel_strategy_kwargs={"find_unused_parameters": True})
    else:
        supernet.to(device)
    train_one_supernet(job, device, shards=world, rank=rank, wrapped=wrapped, supernet=supernet,
                       should_stop=_cancel_poll(job))


def train_supernet_ray(job: SupernetJob, *, workers: int, num_cpus: float = 1.0, num_gpus: float = 0.0,
                       storage_path: str | None = None, max_failures: int = MAX_FAILURES) -> None:
    """Train the supernet of `job` with Ray Train's TorchTrainer: `workers` DDP workers (gloo on
    CPU, NCCL when each has a GPU). Ray must be initialised. A worker that dies (killed, its node
    lost) makes Ray Train restart the worker group, up to `max_failures` times; the restarted
    workers resume from the last epoch's checkpoint artifact (the study's record, not a Ray Train
    checkpoint). Raises what the training raised past that."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = num_gpus > 0
    per_worker = {"CPU": num_cpus, **({"GPU": num_gpus} if use_gpu else {})}
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"job": job, "threads": max(1, int(num_cpus))},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=f"supernet-{job.study_name}-{job.key}".replace("@", "-"),
                             storage_path=storage_path or str(Path(job.artifact_dir).resolve() / "ray"),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    trainer.fit()


def _supernet_task(job: SupernetJob, threads: int) -> None:
    """A Ray task: train (or resume) one supernet with one worker."""
    torch.set_num_threads(max(1, threads))
    train_one_supernet(job, task_device(job.cfg.device), should_stop=_cancel_poll(job))


def train_supernet_task(job: SupernetJob, *, num_cpus: float = 1.0, num_gpus: float = 0.0,
                        max_failures: int = MAX_FAILURES) -> None:
    """Train the supernet of `job` with one worker, as a Ray task (oneshot.workers 1: no process
    group to set up, so none of a TorchTrainer's start-up). Ray must be initialised. A worker that
    dies (killed, its node lost) makes Ray run the task again, up to `max_failures` times; the
    new worker resumes from the last epoch's checkpoint artifact (the study's record). Raises what
    the training raised (an exception in the training is not retried)."""
    import ray

    task = ray.remote(_supernet_task).options(
        num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_failures, retry_exceptions=False,
        name=f"spsa-nas-supernet:{job.study_name}:{job.key}")
    ray.get(task.remote(job, max(1, int(num_cpus))))


@functools.lru_cache(maxsize=2)
def _supernet_from(artifact_dir: str, artifact_id: str) -> Supernet:
    """The trained supernet of a checkpoint artifact (cached: every candidate of a worker uses it)."""
    state = load_checkpoint(artifact_dir, artifact_id)
    supernet = Supernet(ArchSpec.model_validate_json(state["base"]), state["choices"])
    supernet.load_state_dict(state["model"])
    return supernet.eval()


def supernet_fit(study: optuna.Study, cfg: SearchConfig, artifact_dir: str) -> Callable[..., TrainReport]:
    """evaluate_spec's `fit` for a candidate: its path's weights from the trained supernet of its
    backbone and width, BN recalibrated on `oneshot.bn_batches` training batches, then validated."""

    def supernet_for(spec: ArchSpec) -> Supernet:
        key = supernet_key(spec.backbone, spec.width)
        record = _record(study, key)
        if not record.get("done") or not record.get("checkpoint"):
            phase = study.user_attrs.get(PHASE_ATTR)
            raise RuntimeError(f"the supernet {key} is not trained (phase {phase!r}); candidates are "
                               "evaluated after the supernet phase")
        return _supernet_from(artifact_dir, record["checkpoint"])

    return path_fit(supernet_for, cfg)


def path_fit(supernet_for: Callable[[ArchSpec], Supernet], cfg: SearchConfig) -> Callable[..., TrainReport]:
    """evaluate_spec's `fit` on trained supernets: the candidate takes its path's weights from
    `supernet_for(spec)`, recalibrates BN on `oneshot.bn_batches` training batches, is validated
    (supernet_fit's body; the search-quality benchmark's one-shot oracle uses it directly)."""

    def fit(model: torch.nn.Module, splits: Splits, device: torch.device, hooks: EvalHooks) -> TrainReport:
        start = time.perf_counter()
        spec: ArchSpec = model.spec  # type: ignore[assignment]
        supernet = supernet_for(spec)
        weights = {k: v.detach() for k, v in supernet.path_state_dict(spec).items()}
        model.load_state_dict(weights, strict=True)
        recalibrate_bn(model, splits.train, device, batches=cfg.oneshot.bn_batches,
                       batch_size=cfg.train.batch_size, seed=cfg.train.seed)
        acc, loss = evaluate_loss_and_accuracy(model, splits.val, device,
                                               batch_size=max(cfg.train.batch_size, 256))
        return TrainReport(val_curve=[acc], epochs=0, steps=cfg.oneshot.bn_batches,
                           seconds=time.perf_counter() - start, val_loss=loss)

    return fit


#: Why a candidate has no ONNX file (trial attr `onnx_skipped`): exporting took ~70 % of a
#: candidate's evaluation on a CPU (profile: 6.7 s of 9.6 s a candidate on the quick space).
CANDIDATE_NO_ONNX = ("a one-shot candidate (evaluated on the supernet's weights) is exported to ONNX "
                     "when it is retrained (retrain_top_k); download its weights or run `spsa-nas "
                     "export` on them")


def run_oneshot_trial(study: optuna.Study, trial: optuna.Trial, cfg: SearchConfig, space: SearchSpace, *,
                      artifact_dir: str, device: str | None = None,
                      extra_hooks: EvalHooks | None = None) -> FrozenTrial:
    """One trial of a oneshot search: a retraining (user attr `retrain_of`) trains standalone from
    scratch; any other trial is a candidate evaluated on the supernet's weights, on the validation
    split only (the test split is for the retrained finalists: nothing ranks by an estimate's test
    accuracy; testing was ~1/6 of a candidate's time on digits)."""
    store = FileSystemArtifactStore(artifact_dir)
    if RETRAIN_OF_ATTR in trial.user_attrs:
        trial.set_user_attr(ESTIMATE_ATTR, False)
        return run_trial(study, trial, cfg, space, artifact_store=store, device=device,
                         extra_hooks=extra_hooks)
    trial.set_user_attr(ESTIMATE_ATTR, True)
    return run_trial(study, trial, cfg, space, artifact_store=store, device=device, extra_hooks=extra_hooks,
                     fit=supernet_fit(study, cfg, artifact_dir), skip_onnx=CANDIDATE_NO_ONNX, test=False)


def oneshot_trial_fn(study: optuna.Study, trial: optuna.Trial, ctx: Any) -> None:
    """The Ray runner's trial function of a oneshot search (workers.ray_runner.TrialFn)."""
    Path(ctx.artifact_dir).mkdir(parents=True, exist_ok=True)
    run_oneshot_trial(study, trial, ctx.cfg, ctx.space, artifact_dir=ctx.artifact_dir, device=ctx.device,
                      extra_hooks=EvalHooks(latency_lock=ctx.latency_lock, should_stop=ctx.should_stop))


def retrain_choice(study: optuna.Study, cfg: SearchConfig) -> list[FrozenTrial]:
    """The candidates to retrain: the Pareto front of the one-shot estimates (score objective: the
    best scores), the highest estimate first (ranked_accuracy: the oneshot_score where there is
    one), filled up by the same order to retrain_top_k."""
    candidates = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if t.user_attrs.get(ESTIMATE_ATTR) and t.user_attrs.get("val_acc") is not None]
    budget = cfg.objective.latency_budget_ms
    if budget is not None:
        candidates = [t for t in candidates if t.user_attrs["latency_ms"] <= budget]

    def rank(t: FrozenTrial) -> tuple[float, float, int]:
        primary = t.values[0] if cfg.objective.kind == "score" else ranked_accuracy(t)
        return (-primary, t.user_attrs["latency_ms"], t.number)

    numbers = {t.number for t in candidates}
    front = [] if cfg.objective.kind == "score" else [t for t in pareto_front(study) if t.number in numbers]
    chosen = sorted(front, key=rank)[: cfg.retrain_top_k]
    rest = sorted((t for t in candidates if t not in chosen), key=rank)
    seen = {tuple(sorted(t.params.items())) for t in chosen}
    for t in rest:  # fill up, never the same architecture twice
        if len(chosen) >= cfg.retrain_top_k:
            break
        params = tuple(sorted(t.params.items()))
        if params not in seen:
            chosen.append(t)
            seen.add(params)
    return chosen


class OneshotPhases:
    """The phases of one oneshot search, driven by a runner (workers.local or workers.ray_runner)."""

    def __init__(self, study: optuna.Study, cfg: SearchConfig, space: SearchSpace, storage_url: str,
                 artifact_dir: str) -> None:
        if cfg.strategy != "oneshot":
            raise ValueError(f"OneshotPhases needs strategy 'oneshot', got {cfg.strategy!r}")
        self.study, self.cfg, self.space = study, cfg, space
        self.storage_url, self.artifact_dir = storage_url, str(artifact_dir)

    @property
    def phase(self) -> str | None:
        return self.study.user_attrs.get(PHASE_ATTR)

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; valid: {', '.join(PHASES)}")
        if self.phase != phase:
            self.study.set_user_attr(PHASE_ATTR, phase)

    def jobs(self, cancel_attr: str | None = None, deadline: float | None = None) -> list[SupernetJob]:
        return [SupernetJob(storage_url=self.storage_url, study_name=self.study.study_name,
                            artifact_dir=self.artifact_dir, cfg=self.cfg, space=self.space, base=base,
                            cancel_attr=cancel_attr, deadline=deadline)
                for base in supernet_bases(self.cfg, self.space)]

    def deadline(self) -> float | None:
        """The wall-clock end of this run's supernet phase: now + the search's timeout_s (a runner's
        timeout counts from its start, which is just before this phase)."""
        return None if self.cfg.timeout_s is None else time.time() + self.cfg.timeout_s

    def _untrained(self, jobs: list[SupernetJob]) -> list[SupernetJob]:
        """Those of `jobs` whose supernet is not done (the study's records, read once)."""
        records = supernet_records(self.study.user_attrs)
        return [job for job in jobs if not (records.get(job.key) or {}).get("done")]

    def supernets_done(self) -> bool:
        return not self._untrained(self.jobs())

    def train_supernets(self, *, device: str = "cpu", should_stop: Callable[[], bool] | None = None) -> bool:
        """In this process, one worker (the local runner). Cancelled (Cancelled raised) when
        should_stop() says so. Returns False when the search's timeout_s passed first: training
        stopped after the epoch in progress, whose checkpoint resumes it; the phase stays
        `supernet` (no candidate is evaluated on a partly trained supernet) and the runner ends
        on "timeout"."""
        if self.supernets_done():
            self._after_supernets()
            return True
        self.set_phase("supernet")
        deadline = self.deadline()
        for job in self.jobs(deadline=deadline):
            train_one_supernet(job, device, should_stop=should_stop)
            if not _record(self.study, job.key).get("done"):
                return False
        self._after_supernets()
        return True

    def train_supernets_ray(self, *, run_id: str, should_cancel: Callable[[], bool] | None,
                            poll_s: float = 1.0) -> bool:
        """On Ray, the supernets not yet trained at once, as many together as the search's
        parallelism allows (each takes `oneshot.workers` x the trial's resources): one worker is a
        Ray task (train_supernet_task), several are Ray Train's DDP workers (train_supernet_ray).
        The coordinator polls `should_cancel` meanwhile and tells the workers through the run's
        cancel attr. Returns False when cancelled. Past the search's timeout_s the workers stop
        after the epoch in progress (checkpointed) and this returns True with the phase still
        `supernet`: the runner, past its timeout too, ends on "timeout". A supernet whose training
        failed (past its retries) raises RuntimeError once the others have finished theirs."""
        if self.supernets_done():
            self._after_supernets()
            return True
        self.set_phase("supernet")
        cancel_attr = run_cancel_attr(run_id)
        pending = self._untrained(self.jobs(cancel_attr=cancel_attr, deadline=self.deadline()))
        slots = max(1, self.cfg.parallelism // self.cfg.oneshot.workers)
        running: list[tuple[threading.Thread, SupernetJob]] = []
        errors: dict[str, BaseException] = {}
        cancelled = False

        def fit(job: SupernetJob) -> None:
            resources, workers = self.cfg.resources, self.cfg.oneshot.workers
            try:
                if workers == 1:
                    train_supernet_task(job, num_cpus=resources.num_cpus, num_gpus=resources.num_gpus)
                else:
                    train_supernet_ray(job, workers=workers, num_cpus=resources.num_cpus,
                                       num_gpus=resources.num_gpus)
            except BaseException as exc:  # handed to the coordinator's thread
                errors[job.key] = exc

        while pending or running:
            while pending and len(running) < slots and not cancelled and not errors:
                job = pending.pop(0)
                thread = threading.Thread(target=fit, args=(job,), name=f"supernet-{job.key}", daemon=True)
                thread.start()
                running.append((thread, job))
            if not running:
                break  # cancelled or failed: the supernets not started stay untrained
            running[0][0].join(poll_s)
            running = [(thread, job) for thread, job in running if thread.is_alive()]
            if not cancelled and should_cancel is not None and should_cancel():
                cancelled = True
                self.study.set_user_attr(cancel_attr, True)
        if cancelled:
            return False
        if errors:
            key, error = next(iter(errors.items()))
            raise RuntimeError(f"supernet {key} training failed: {error}") from error
        if not self.supernets_done():  # stopped by the deadline
            return True
        self._after_supernets()
        return True

    def _after_supernets(self) -> None:
        if self.phase in (None, "supernet"):
            self.set_phase("candidates")

    def retrains(self) -> list[int]:
        return list(self.study.user_attrs.get(RETRAIN_ATTR) or [])

    def target(self) -> int:
        """Finished trials the search needs now: the candidates, plus the retrainings once enqueued."""
        return self.cfg.trials + len(self.retrains())

    def advance(self) -> bool:
        """Called when `target()` trials are finished: enqueue the retrainings (True: more trials to
        run) or mark the search done (False)."""
        if self.phase in (None, "supernet", "candidates") and RETRAIN_ATTR not in self.study.user_attrs:
            chosen = retrain_choice(self.study, self.cfg)
            for trial in chosen:  # the retrained trial carries the estimate it is compared with
                attrs = {RETRAIN_OF_ATTR: trial.number, "oneshot_val_acc": trial.user_attrs.get("val_acc"),
                         "oneshot_val_loss": trial.user_attrs.get("val_loss")}
                if trial.user_attrs.get("top1") is not None:  # a candidate of a study from before it skipped
                    attrs["oneshot_top1"] = trial.user_attrs["top1"]  # the test split
                self.study.enqueue_trial(trial.params, user_attrs=attrs, skip_if_exists=False)
            self.study.set_user_attr(RETRAIN_ATTR, [t.number for t in chosen])
            if chosen:
                self.set_phase("retrain")
                return True
        self.set_phase("done")
        return False


__all__ = [
    "PHASES",
    "OneshotPhases",
    "SupernetJob",
    "build_supernet",
    "load_checkpoint",
    "oneshot_trial_fn",
    "path_fit",
    "retrain_choice",
    "run_oneshot_trial",
    "sandwich_extremes",
    "supernet_bases",
    "supernet_choices",
    "supernet_fit",
    "supernet_key",
    "supernet_run",
    "supernet_splits",
    "train_one_supernet",
    "train_supernet_ray",
    "train_supernet_task",
    "uniform_sampler",
]
