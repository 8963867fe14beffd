"""SearchConfig: everything one search is (space, data, budgets, objective, sampler), as data."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spsa_nas.config import (
    DETECTION_DATASETS,
    DETECTION_LATENCY_RUNTIMES,
    DataConfig,
    LatencyConfig,
    TrainConfig,
)

STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ObjectiveConfig(_Config):
    """What a trial is scored on.

    pareto: two objectives, maximise validation accuracy and minimise median latency (ms).
    score: one objective, MnasNet's acc * (lat / target) ** w, maximised; soft: w = weight
    everywhere; hard: w = 0 under the target and -1 above it. Pruners apply to `score` only.
    latency_budget_ms (both kinds): a candidate slower than this is rejected before training.
    """

    kind: Literal["pareto", "score"] = "pareto"
    latency_target_ms: float | None = Field(None, gt=0)
    weight: float = Field(-0.07, ge=-2, le=0)
    hard: bool = False
    latency_budget_ms: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _score_needs_target(self) -> ObjectiveConfig:
        if self.kind == "score" and self.latency_target_ms is None:
            raise ValueError("objective.latency_target_ms is required when objective.kind is "
                             "'score'")
        return self


class Resources(_Config):
    """Ray resources of one trial (fractional GPUs allowed)."""

    num_cpus: float = Field(1.0, ge=0, le=1024)
    num_gpus: float = Field(0.0, ge=0, le=64)
    # Ray's `memory` resource of one trial (scheduling), also the trial process's RSS limit (the
    # runner kills a trial past it: counted as a crash); None: the runner's default (no limit).
    memory_gb: float | None = Field(None, gt=0, le=4096)


class OneshotConfig(_Config):
    """The supernet phase of the `oneshot` strategy (see docs/search.md, One-shot search).

    The supernet trains with the search's `train` recipe (batch size, lr, ...) for `epochs`;
    each candidate then takes its path's weights and recalibrates BatchNorm on `bn_batches`
    training batches before its validation accuracy is measured.
    """

    epochs: int | None = Field(None, ge=1, le=1000, description="supernet epochs; None: 2 x train.epochs")
    bn_batches: int = Field(8, ge=1, le=1000, description="training batches per BN recalibration")
    workers: int = Field(1, ge=1, le=256, description="workers of each supernet on the Ray runner: 1 "
                                                      "(one machine) trains in a Ray task, more "
                                                      "data-parallel with Ray Train DDP")
    sampling: Literal["uniform", "fair", "sandwich"] = Field(
        "uniform", description="paths per supernet step: uniform (one, SPOS), fair (FairNAS strict "
                               "fairness: every channel-attention branch once per step) or sandwich "
                               "(BigNAS: the largest path, the smallest and sandwich_paths random ones)")
    sandwich_paths: int = Field(2, ge=1, le=64, description="sampling sandwich: random paths per step "
                                                            "beside the largest and the smallest")
    estimate: Literal["loss", "accuracy"] = Field(
        "loss", description="what ranks the candidates (the first objective, the Pareto front, the "
                            "finalists): loss = exp(-validation cross-entropy) on the supernet's weights "
                            "(the geometric mean of the true class's probability; Kendall tau 0.76-0.78 "
                            "against standalone accuracy where the top-1 estimate gave 0.17-0.31, "
                            "docs/search.md), or accuracy = the top-1 estimate")

    def supernet_epochs(self, train: TrainConfig) -> int:
        """The epochs the supernet trains: `epochs`, else twice the standalone budget."""
        return self.epochs if self.epochs is not None else 2 * train.epochs


class ReseedConfig(_Config):
    """Accuracy noise: when a search's run ends (done or timeout), its top `top_k` complete trials by
    validation accuracy are trained again with `seeds` - 1 more training seeds (train.seed + 1, ...),
    so that `best` ties on their accuracy over seeds (mean ± std) instead of the one-seed tolerance.
    Both runners; within what is left of the run's `timeout_s`, stopped by a cancel (docs/latency.md)."""

    top_k: int = Field(0, ge=0, le=100, description="trials re-trained with more seeds when the search "
                                                     "ends; 0: off (one seed per trial)")
    seeds: int = Field(2, ge=2, le=100, description="training seeds in all per re-trained trial, its "
                                                     "own run included")

    def trainings(self) -> int:
        """The extra trainings it asks for (each of train.epochs epochs): top_k x (seeds - 1)."""
        return self.top_k * (self.seeds - 1)


#: The training recipe of a detection search, for each `train` field its config does not set: a
#: detector trained from scratch needs hundreds of steps, the classifier defaults give it a handful
#: (3 epochs of batch 64: about one step an epoch on the shapes data, box AP ~0). On the shapes data
#: (256 images of 96 px) these reach test AP ~0.3 / AP50 ~0.5 in minutes (docs/detection.md).
DETECTION_TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 25, "batch_size": 8, "lr": 0.02, "warmup_epochs": 1,
                                            "weight_decay": 1e-4}


def detection_train_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """The `train` fields of a detection search: `given` (the fields its config sets) over
    DETECTION_TRAIN_DEFAULTS; the warm-up default only where `epochs` is not given either (a search
    that asks for 1 epoch gets no warm-up epoch it would have to refuse)."""
    recipe = {key: value for key, value in DETECTION_TRAIN_DEFAULTS.items()
              if key not in given and (key != "warmup_epochs" or "epochs" not in given)}
    return {**recipe, **given}


def _given_train(train: Any) -> dict[str, Any] | None:
    """The fields a config's `train` value sets (a dict, or a TrainConfig's fields_set); None if it
    is neither (validation then reports it)."""
    if train is None:
        return {}
    if isinstance(train, TrainConfig):
        return train.model_dump(exclude_unset=True)
    return dict(train) if isinstance(train, dict) else None


Strategy = Literal["standalone", "oneshot"]
STRATEGIES: tuple[str, ...] = ("standalone", "oneshot")


class SearchConfig(_Config):
    """One search: the space, the data, the budgets, the objective and how to explore."""

    study_name: str = "spsa-nas"
    space: str | dict[str, Any] = "quick"  # a built-in name, a YAML path, or an inline space
    dataset: DataConfig = DataConfig()
    trials: int = Field(8, ge=1, le=100_000)  # finished trials (complete or pruned) to reach
    timeout_s: float | None = Field(None, gt=0)  # wall-clock budget of the whole search
    objective: ObjectiveConfig = ObjectiveConfig()
    sampler: Literal["auto", "tpe", "nsga2", "random"] = "auto"
    pruner: Literal["none", "median", "hyperband"] = "none"
    train: TrainConfig = TrainConfig()
    latency: LatencyConfig = LatencyConfig()
    device: str = "auto"  # "auto": cuda when the worker has a GPU, else cpu
    seed: int = 0
    parallelism: int = Field(1, ge=1, le=1024)  # trials in flight at once
    resources: Resources = Resources()
    max_retries: int = Field(2, ge=0, le=100)  # re-runs of a trial whose worker died
    # standalone: every candidate trains from scratch; oneshot: one weight-sharing supernet is
    # trained, candidates are evaluated on its weights, the best `retrain_top_k` are retrained
    strategy: Strategy = "standalone"
    retrain_top_k: int = Field(3, ge=0, le=100, description="oneshot: Pareto candidates retrained "
                                                            "standalone at the end")
    oneshot: OneshotConfig = OneshotConfig()
    reseed: ReseedConfig = ReseedConfig()  # the top-k re-trained with more seeds at the end (0: off)

    @model_validator(mode="before")
    @classmethod
    def _detection_recipe(cls, data: Any) -> Any:
        """Detection data: the `train` fields not given take DETECTION_TRAIN_DEFAULTS."""
        if not isinstance(data, dict):
            return data
        dataset = data.get("dataset")
        name = dataset.get("name") if isinstance(dataset, dict) else getattr(dataset, "name", None)
        given = _given_train(data.get("train"))
        if name not in DETECTION_DATASETS or given is None:
            return data
        return {**data, "train": detection_train_defaults(given)}

    @model_validator(mode="after")
    def _reseed_trains(self) -> SearchConfig:
        if self.reseed.top_k and self.dataset.name in DETECTION_DATASETS:
            raise ValueError(f"reseed.top_k: a detection search's trials are not re-trained with more "
                             f"seeds (dataset {self.dataset.name!r} is detection data); set 0")
        return self

    @model_validator(mode="after")
    def _pruner_needs_score(self) -> SearchConfig:
        if self.pruner != "none" and self.objective.kind != "score":
            raise ValueError(f"pruner: {self.pruner!r} needs objective.kind 'score' (Optuna's pruners "
                             "compare one value; the pareto objective has two); use pruner 'none'")
        return self

    @model_validator(mode="after")
    def _runtime_measures_the_task(self) -> SearchConfig:
        # detection data means a detection space (create_study refuses any other pairing), whose
        # candidates only some runtimes can measure (spsa_nas.evaluate.check_runtime_for)
        if self.dataset.name in DETECTION_DATASETS and self.latency.runtime not in DETECTION_LATENCY_RUNTIMES:
            raise ValueError(f"latency.runtime: {self.latency.runtime!r} cannot measure a detector "
                             f"(dataset {self.dataset.name!r} is detection data); use "
                             f"{' or '.join(DETECTION_LATENCY_RUNTIMES)}")
        if (self.dataset.name in DETECTION_DATASETS and self.latency.runtime == "onnxruntime"
                and self.latency.batch_size != 1):
            raise ValueError("latency.batch_size: onnxruntime measures a detector on one image; set 1")
        return self

    @field_validator("study_name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not STUDY_NAME_RE.match(value):
            raise ValueError("study_name: 1-128 characters of letters, digits and _ . : -, "
                             "starting with a letter or digit")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError("device: one of auto, cpu, cuda, cuda:N, mps")
        return value
