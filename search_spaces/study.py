"""Optuna studies of a search: storage, creation with the config, objectives, Pareto front, selection."""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from search_spaces.config import ObjectiveConfig, SearchConfig
from search_spaces.keys import CONFIG_ATTR, ESTIMATE_ATTR, ONESHOT_SCORE_ATTR, RETRAIN_OF_ATTR, SPACE_ATTR
from search_spaces.loading import load_space
from search_spaces.space import SearchSpace
from search_spaces.storage import as_storage
from spsa_nas.config import DETECTION_DATASETS

# What optuna-dashboard writes on the plots' axes (the study's metric names), per objective kind.
METRIC_NAMES = {"pareto": ["validation accuracy", "latency (ms)"], "score": ["score"]}
#: A detection space's pareto metrics: its accuracy is the validation box AP (docs/detection.md).
DETECTION_METRIC_NAMES = ["validation box AP", "latency (ms)"]

# Fields of SearchConfig that a resumed run may change: budgets, where the process runs, and the
# re-training of the top-k with more seeds at the end (reseed: it changes no trial).
# Everything else (space, data, training, objective, sampler, seed, device) defines the study.
_RUN_FIELDS = ("trials", "timeout_s", "parallelism", "resources", "max_retries", "space", "reseed")
_RUN_DATA_FIELDS = ("data_root", "download")


def directions(cfg: SearchConfig) -> list[str]:
    """Optuna directions of the objective kind: pareto (acc max, latency min) or score (max)."""
    return ["maximize", "minimize"] if cfg.objective.kind == "pareto" else ["maximize"]


def make_sampler(cfg: SearchConfig, *, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler of `cfg`, seeded by cfg.seed (+ `seed_offset` when a study resumes).

    "auto" is "tpe": multivariate TPE with grouped conditional parameters. Over 20 seeds x 40 trials
    on the `quick` space (benchmarks/bench_search_quality.py with the one-shot oracle on the
    gratings task, latencies as interleaved ratios; docs/search.md) it reached a final normalised
    hypervolume 1.14x random search's [1.08, 1.19], and random search's final hypervolume within
    half the trials on 14 of 20 seeds; NSGA-II ("nsga2", population trials / 3 clamped to 4-50,
    the default before) was no better than random search (1.00x [0.94, 1.05], 3 of 20 seeds).
    """
    seed = cfg.seed + 1_000_003 * seed_offset
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(4, min(50, cfg.trials // 3)),
                                             seed=seed)
    if cfg.sampler in ("auto", "tpe"):
        with warnings.catch_warnings():  # `group` is marked experimental; we rely on it knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(n_startup_trials=min(10, max(3, cfg.trials // 4)),
                                              multivariate=True, group=True, seed=seed,
                                              constant_liar=True)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {cfg.sampler!r}; valid: auto, tpe, nsga2, random")


def make_pruner(cfg: SearchConfig) -> optuna.pruners.BasePruner:
    """The pruner of `cfg`; pruners apply to the score objective only."""
    if cfg.pruner != "none" and cfg.objective.kind != "score":
        raise ValueError(f"pruner {cfg.pruner!r} needs objective kind 'score': the pareto objective "
                         "has two values and Optuna's pruners compare one; use --pruner none or "
                         "--objective score with --latency-target")
    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs)
    raise ValueError(f"unknown pruner {cfg.pruner!r}; valid: none, median, hyperband")


def _identity(cfg: SearchConfig, space: SearchSpace) -> dict[str, Any]:
    data = cfg.model_dump(mode="json")
    for field in _RUN_FIELDS:
        data.pop(field, None)
    for field in _RUN_DATA_FIELDS:
        data["dataset"].pop(field, None)
    data["space"] = space.model_dump(mode="json", exclude_unset=True)
    return data


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [f"{path}: {json.dumps(old)} -> {json.dumps(new)}"]


def create_study(cfg: SearchConfig, storage: str | BaseStorage, *, space: SearchSpace | None = None
                 ) -> optuna.Study:
    """Create the study `cfg.study_name`, or load it when it exists with the same configuration.

    The configuration is stored as the study's user attrs `spsa_nas:config` (SearchConfig JSON:
    the one stored copy of a search's config) and `spsa_nas:space` (the resolved space); the
    study's metric names (METRIC_NAMES) label optuna-dashboard's plots. A study created with
    another configuration (space, data, training, objective, sampler, seed, device) is refused,
    never mixed; the budgets (trials, timeout, parallelism, resources, retries) and `reseed` may
    change between runs.
    """
    storage = as_storage(storage)
    space = space or load_space(cfg.space)
    if cfg.strategy not in space.strategies:
        raise ValueError(f"strategy: space {space.name!r} supports {', '.join(space.strategies)}, "
                         f"not {cfg.strategy!r}")
    if (space.task == "detection") != (cfg.dataset.name in DETECTION_DATASETS):
        other = "detection" if space.task != "detection" else "classification"
        raise ValueError(f"dataset.name: space {space.name!r} is a {space.task} space but "
                         f"{cfg.dataset.name!r} is {other} data; detection data: "
                         f"{', '.join(DETECTION_DATASETS)}")
    pruner = make_pruner(cfg)
    study = optuna.create_study(storage=storage, study_name=cfg.study_name, directions=directions(cfg),
                                sampler=make_sampler(cfg), pruner=pruner, load_if_exists=True)
    identity = _identity(cfg, space)
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is not None:
        old_cfg = SearchConfig.model_validate_json(stored) if isinstance(stored, str) else \
            SearchConfig.model_validate(stored)
        old_space = load_space(study.user_attrs.get(SPACE_ATTR) or old_cfg.space)
        differences = _diff(_identity(old_cfg, old_space), identity)
        if differences:
            shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more"
                                                  if len(differences) > 5 else "")
            raise ValueError(f"study {cfg.study_name!r} already exists with a different configuration "
                             f"({shown}); use another study name, or the same settings to resume it")
        existing = len(study.get_trials(deepcopy=False))
        if existing:  # a resumed run must not replay the same random sequence
            study.sampler = make_sampler(cfg, seed_offset=existing)
    study.set_user_attr(CONFIG_ATTR, cfg.model_dump_json())
    study.set_user_attr(SPACE_ATTR, space.model_dump(mode="json", exclude_unset=True))
    with warnings.catch_warnings():  # metric names are marked experimental; we rely on them knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        names = METRIC_NAMES[cfg.objective.kind]
        if space.task == "detection" and cfg.objective.kind == "pareto":
            names = DETECTION_METRIC_NAMES
        if study.metric_names != names:
            study.set_metric_names(names)
    return study


def load_study(name: str, storage: str | BaseStorage) -> optuna.Study:
    """An existing study (KeyError naming the studies there when it does not exist)."""
    storage = as_storage(storage)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name not in names:
        raise KeyError(f"no study {name!r} in this storage; studies there: "
                       f"{', '.join(names) if names else 'none'}")
    study = optuna.load_study(study_name=name, storage=storage)
    if CONFIG_ATTR in study.user_attrs:
        cfg = study_config(study)
        study.pruner = make_pruner(cfg)
        study.sampler = make_sampler(cfg, seed_offset=len(study.get_trials(deepcopy=False)))
    return study


def study_config(study: optuna.Study) -> SearchConfig:
    """The SearchConfig the study was created with."""
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is None:
        raise KeyError(f"study {study.study_name!r} was not created by spsa-nas (no {CONFIG_ATTR})")
    if isinstance(stored, str):
        return SearchConfig.model_validate_json(stored)
    return SearchConfig.model_validate(stored)


def study_space(study: optuna.Study) -> SearchSpace:
    """The resolved search space stored with the study (independent of files on this machine)."""
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is None:
        return load_space(study_config(study).space)
    return load_space(stored, source=f"study {study.study_name!r}")


def mnas_score(acc: float, latency_ms: float, objective: ObjectiveConfig) -> float:
    """MnasNet's acc * (lat / target) ** w; hard: w = 0 under the target, -1 above it."""
    target = objective.latency_target_ms
    if target is None:
        raise ValueError("the score objective needs objective.latency_target_ms")
    weight = (0.0 if latency_ms <= target else -1.0) if objective.hard else objective.weight
    return acc * (latency_ms / target) ** weight


def _latency_ms(metrics: dict[str, Any]) -> float:
    if metrics.get("latency_ms") is not None:
        return float(metrics["latency_ms"])
    latency = metrics.get("latency")
    if isinstance(latency, dict) and latency.get("median_ms") is not None:
        return float(latency["median_ms"])
    raise ValueError("trial metrics have no latency (latency_ms or latency.median_ms)")


def oneshot_score(result_metrics: dict[str, Any], cfg: SearchConfig) -> float | None:
    """What ranks a one-shot candidate under `oneshot.estimate` "loss": exp(-validation cross-entropy)
    on the supernet's weights, the geometric mean of the probability it gives the true class (in
    (0, 1], ordered as the loss). None for other trials (standalone, retrained: no `val_loss`) and
    under estimate "accuracy", which rank by `val_acc`."""
    loss = result_metrics.get("val_loss")
    if cfg.strategy != "oneshot" or cfg.oneshot.estimate != "loss" or loss is None:
        return None
    if not math.isfinite(float(loss)):
        raise ValueError(f"trial metrics have no finite validation loss (val_loss={loss!r})")
    return math.exp(-float(loss))


def ranked_accuracy(trial: FrozenTrial) -> float:
    """The accuracy figure a trial is ranked by (Pareto front, best, finalists): a one-shot
    candidate's `oneshot_score` where it has one, else its validation accuracy."""
    score = trial.user_attrs.get(ONESHOT_SCORE_ATTR)
    return float(score if score is not None else trial.user_attrs["val_acc"])


def objective_values(result_metrics: dict[str, Any], cfg: SearchConfig) -> list[float]:
    """Objective values to tell: pareto -> [val_acc, latency_ms]; score -> [score]. A one-shot
    candidate's accuracy objective is its oneshot_score where it has one (oneshot.estimate)."""
    score = oneshot_score(result_metrics, cfg)
    acc = result_metrics.get("val_acc") if score is None else score
    if acc is None or not math.isfinite(float(acc)):
        raise ValueError(f"trial metrics have no finite validation accuracy (val_acc={acc!r})")
    latency = _latency_ms(result_metrics)
    if cfg.objective.kind == "pareto":
        return [float(acc), latency]
    return [mnas_score(float(acc), latency, cfg.objective)]


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("val_acc") is not None and t.user_attrs.get("latency_ms") is not None]


def pareto_front(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> list[FrozenTrial]:
    """Complete trials (or those of `trials`) not dominated in (validation accuracy up, median latency
    down), by latency. The accuracy is ranked_accuracy's (a one-shot candidate's oneshot_score where it
    has one)."""
    chosen = _complete(study) if trials is None else trials
    points = [(t, ranked_accuracy(t), float(t.user_attrs["latency_ms"])) for t in chosen]
    front = [(t, acc, lat) for t, acc, lat in points
             if not any(a >= acc and la <= lat and (a > acc or la < lat) for _, a, la in points)]
    return [t for t, _, _ in sorted(front, key=lambda p: (p[2], -p[1], p[0].number))]


def choosable(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials `best` chooses among: a oneshot study's retrained candidates (user attr `retrain_of`)
    when any is there (their accuracies are measured, the others' are supernet estimates), else all."""
    retrained = [t for t in trials if t.user_attrs.get(RETRAIN_OF_ATTR) is not None]
    return retrained or trials


def select_best(study: optuna.Study, *, latency_budget_ms: float | None = None,
                trial_number: int | None = None) -> FrozenTrial:
    """The one architecture to hand out: the rule the CLI and the service share.

    `trial_number`: that trial (it must be complete). Otherwise among the complete trials whose
    median latency is within `latency_budget_ms` (default: the study's objective budget, if any):
    pareto studies -> the highest validation accuracy (a one-shot candidate: its oneshot_score where
    it has one, as every ranking here), ties to the lower latency, then the lower
    trial number; score studies -> the highest score, ties likewise. A oneshot study chooses among
    its retrained candidates (user attr `retrain_of`) when any qualifies: their accuracies are
    measured, the others' are supernet estimates. LookupError when none qualifies.
    """
    if trial_number is not None:
        matches = [t for t in study.get_trials(deepcopy=False) if t.number == trial_number]
        if not matches:
            raise LookupError(f"study {study.study_name!r} has no trial {trial_number}")
        trial = matches[0]
        if trial.state != TrialState.COMPLETE:
            raise LookupError(f"trial {trial_number} is {trial.state.name}, not COMPLETE: it has no "
                              "trained weights")
        return trial
    budget = latency_budget_ms
    kind = "pareto"
    if CONFIG_ATTR in study.user_attrs:
        objective = study_config(study).objective
        kind = objective.kind
        if budget is None:
            budget = objective.latency_budget_ms
    trials = _complete(study)
    if budget is not None:
        trials = [t for t in trials if t.user_attrs["latency_ms"] <= budget]
    trials = choosable(trials)  # oneshot: real accuracies of retrained finalists before supernet estimates
    if not trials:
        within = f" within {budget:g} ms" if budget is not None else ""
        counts = trial_counts(study)
        raise LookupError(f"study {study.study_name!r} has no complete trial{within} "
                          f"({counts['complete']} complete, {counts['pruned']} pruned, "
                          f"{counts['fail']} failed)")

    def key(t: FrozenTrial) -> tuple[float, float, int]:
        primary = t.values[0] if kind == "score" and t.values else ranked_accuracy(t)
        return (-primary, t.user_attrs["latency_ms"], t.number)

    return min(trials, key=key)


#: The figures of a oneshot candidate that come from the supernet's weights (estimates).
ESTIMATED_METRICS = ("val_acc", "top1", "top5", "val_curve", "val_loss", ONESHOT_SCORE_ATTR)


def estimated_metrics(attrs: dict[str, Any]) -> list[str]:
    """Which of a trial's metrics are one-shot estimates (none for standalone or retrained trials);
    only those it has (a candidate has no top1/top5 since it skips the test split)."""
    if not attrs.get(ESTIMATE_ATTR):
        return []
    return [name for name in ESTIMATED_METRICS if attrs.get(name) is not None]


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Number of trials by state: complete, pruned, fail, running, waiting."""
    counts = dict.fromkeys(("complete", "pruned", "fail", "running", "waiting"), 0)
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] += 1
    return counts


def describe_spec(spec: dict[str, Any]) -> str:
    """A short summary of a spec dict: backbone, width and per stage SPSA (heads, alpha, "/fwd"
    without the reverse, "/cos" with cosine similarity) or NL / GC, and the channel attention."""
    parts = []
    for i, stage in enumerate(spec.get("stages", []), start=1):
        bits = []
        if stage.get("spsa"):
            bits.append(f"spsa{stage.get('spsa_heads', 1)}h/a{stage.get('spsa_alpha', 1.0):g}"
                        + ("/fwd" if stage.get("spsa_reverse", True) is False else "")
                        + ("/cos" if stage.get("spsa_similarity", "correlation") == "cosine" else ""))
        elif stage.get("spatial_attn", "none") != "none":
            bits.append("nl" if stage["spatial_attn"] == "nonlocal" else "gc")
        if stage.get("channel_attn", "none") != "none":
            bits.append(stage["channel_attn"])
        if len(bits) == 2 and stage.get("attn_order") == "spsa_first":
            bits.reverse()
        parts.append(f"s{i}:" + ("+".join(bits) if bits else "-"))
    return f"{spec.get('backbone')} w{spec.get('width', 1.0):g} " + " ".join(parts)


def finished(counts: dict[str, int]) -> int:
    """Trials that count toward the budget: complete + pruned."""
    return counts["complete"] + counts["pruned"]


__all__ = [
    "ESTIMATED_METRICS",
    "METRIC_NAMES",
    "choosable",
    "create_study",
    "describe_spec",
    "directions",
    "estimated_metrics",
    "load_study",
    "make_pruner",
    "make_sampler",
    "mnas_score",
    "objective_values",
    "pareto_front",
    "select_best",
    "study_config",
    "study_space",
    "trial_counts",
]
