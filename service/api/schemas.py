"""Request and response bodies of the API, one family per resource (XCreate, XPublic, XsPublic)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from search_spaces.config import ObjectiveConfig, Resources
from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig

SearchStatus = Literal["queued", "running", "cancelling", "completed", "failed", "cancelled"]
TrialStateName = Literal["RUNNING", "COMPLETE", "PRUNED", "FAIL", "WAITING"]


class DatasetCreate(DataConfig):
    """The dataset of a search; `path` is relative to the server's data root, which the server sets."""

    data_root: SkipJsonSchema[None] = Field(None, description="set by the server, never by a client")


class SearchCreate(BaseModel):
    """A search to run. Only what differs from the defaults needs to be given."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=128, description="a label of your choice")
    space: str | dict[str, Any] = Field(
        "quick", description="a built-in space name (GET /api/v1/spaces) or an inline space"
    )
    dataset: DatasetCreate = DatasetCreate()
    trials: int = Field(8, ge=1, le=100_000, description="finished trials (complete or pruned) to reach")
    timeout_s: float | None = Field(None, gt=0, description="wall-clock budget of the whole search")
    objective: ObjectiveConfig = ObjectiveConfig()
    sampler: Literal["auto", "tpe", "nsga2", "random"] = "auto"
    pruner: Literal["none", "median", "hyperband"] = "none"
    train: TrainConfig = TrainConfig()
    latency: LatencyConfig = LatencyConfig()
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    parallelism: int = Field(1, ge=1, le=1024, description="trials in flight at once")
    resources: Resources = Resources()
    max_retries: int = Field(2, ge=0, le=100)


class Links(BaseModel):
    self: str
    trials: str
    dashboard: str | None = Field(None, description="optuna-dashboard page of the study (after /login)")


class BestSoFar(BaseModel):
    trial: int
    values: list[float] | None
    val_acc: float | None = None
    latency_ms: float | None = None


class Progress(BaseModel):
    trials_requested: int
    finished: int = Field(description="complete + pruned: what counts towards `trials_requested`")
    complete: int
    pruned: int
    failed: int
    running: int
    waiting: int
    best: BestSoFar | None
    elapsed_s: float | None = Field(description="since the search started")
    mean_trial_s: float | None = Field(description="mean duration of the finished trials")


class SearchPublic(BaseModel):
    id: str
    name: str | None
    owner: str
    status: SearchStatus
    study_name: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    config: dict[str, Any] = Field(description="the full search configuration, defaults included")
    progress: Progress | None = Field(None, description="trial counts, best so far, timings")
    summary: dict[str, Any] | None = Field(None, description="the runner's report once the search ended")
    links: Links


class SearchSummary(BaseModel):
    id: str
    name: str | None
    owner: str
    status: SearchStatus
    created_at: datetime
    finished_at: datetime | None
    links: Links


class SearchesPublic(BaseModel):
    data: list[SearchSummary]
    count: int


class TrialPublic(BaseModel):
    number: int
    state: TrialStateName
    values: list[float] | None
    params: dict[str, Any]
    metrics: dict[str, Any] = Field(description="val_acc, top1, top5, latency_ms, params, flops, ...")
    spec: dict[str, Any] | None = Field(description="the ArchSpec JSON of the trial's architecture")
    has_weights: bool
    datetime_start: datetime | None
    datetime_complete: datetime | None
    duration_s: float | None


class TrialsPublic(BaseModel):
    data: list[TrialPublic]
    count: int


class BestPublic(BaseModel):
    trial: int
    spec: dict[str, Any]
    metrics: dict[str, Any]
    values: list[float] | None
    links: dict[str, str]


class SpacePublic(BaseModel):
    name: str
    space: dict[str, Any]


class SpacesPublic(BaseModel):
    data: list[SpacePublic]
    count: int


class Message(BaseModel):
    detail: str


class Health(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]
