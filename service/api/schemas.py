"""Request and response bodies of the API, one family per resource (XCreate, XPublic, XsPublic)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue, SkipJsonSchema
from pydantic_core import core_schema

from search_spaces.config import ObjectiveConfig, OneshotConfig, ReseedConfig, Resources, SearchConfig
from search_spaces.loading import builtin_spaces
from search_spaces.run import RunReport
from search_spaces.space import SearchSpace
from service.core.settings import Settings
from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig

SearchStatus = Literal["queued", "running", "cancelling", "completed", "failed", "cancelled"]
TrialStateName = Literal["RUNNING", "COMPLETE", "PRUNED", "FAIL", "WAITING"]


def _utc(value: datetime) -> datetime:
    """A naive datetime is UTC (what the service's tables hold); an aware one is moved to UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Answered with its zone (`...Z`), as the schema's `date-time` format requires.
UTCDatetime = Annotated[datetime, AfterValidator(_utc)]


# ---------------------------------------------------------------------------------------------
# The REST body of a search: SearchConfig's own fields, restricted. Its nested models are strict
# (no "5" for 5, no 1 for true): the body accepts what its schema says, nothing more.


def _strict(model: type[BaseModel], **schema_extra: Any) -> type[BaseModel]:
    """`model` as a strict request body (same fields, validators and name), its JSON schema
    completed by `schema_extra` (rules between fields)."""
    config = ConfigDict(**{**model.model_config, "strict": True})  # type: ignore[typeddict-item]
    if schema_extra:
        config["json_schema_extra"] = schema_extra
    return type(model.__name__, (model,), {"model_config": config, "__doc__": model.__doc__})


class DatasetCreate(_strict(DataConfig)):  # type: ignore[misc]
    """The dataset of a search; `path` is relative to the server's data root, which the server sets."""

    data_root: SkipJsonSchema[None] = Field(None, description="set by the server, never by a client")

    @staticmethod
    def _schema(schema: dict[str, Any]) -> None:
        """A path is never empty, and imagefolder and coco need one."""
        schema["properties"]["path"]["anyOf"][0]["minLength"] = 1
        schema["if"] = {"properties": {"name": {"enum": ["imagefolder", "coco"]}}, "required": ["name"]}
        schema["then"] = {"properties": {"path": {"type": "string"}}, "required": ["path"]}

    model_config = ConfigDict(json_schema_extra=_schema)


ObjectiveCreate = _strict(  # kind "score" needs latency_target_ms
    ObjectiveConfig,
    **{
        "if": {"properties": {"kind": {"const": "score"}}, "required": ["kind"]},
        "then": {"properties": {"latency_target_ms": {"type": "number"}}, "required": ["latency_target_ms"]},
    },
)


class _BuiltinSpaceName:
    """JSON schema of a built-in space's name: the names this server has, as an enum."""

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "enum": sorted(builtin_spaces()), "title": "Built-in space"}


class _InlineSpace:
    """JSON schema of an inline space: SearchSpace's (the search engine checks it further)."""

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(SearchSpace.__pydantic_core_schema__)


SERVER_ONLY = frozenset({"study_name"})  # the server names the study
# What the REST body changes of SearchConfig's fields: a type (strict models; data_root out of
# the dataset) and constraints and descriptions added to SearchConfig's own.
_REST_TYPES: dict[str, Any] = {
    "space": Annotated[str, _BuiltinSpaceName] | Annotated[dict[str, Any], _InlineSpace],
    "dataset": DatasetCreate,
    "objective": ObjectiveCreate,
    "train": _strict(TrainConfig),
    "latency": _strict(LatencyConfig),
    "resources": _strict(Resources),
    "oneshot": _strict(OneshotConfig),
    "reseed": _strict(ReseedConfig),
}
_REST_FIELDS: dict[str, FieldInfo] = {
    "space": Field(description="a built-in space name (GET /api/v1/spaces) or an inline space"),
    "trials": Field(description="finished trials (complete or pruned) to reach"),
    "timeout_s": Field(description="wall-clock budget of the whole search"),
    "device": Field(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto: cuda where a GPU is"),
    "seed": Field(ge=0, le=2**32 - 1),
    "parallelism": Field(description="trials in flight at once"),
    "max_retries": Field(description="re-runs of a trial whose worker died"),
}


def _search_schema(schema: dict[str, Any]) -> None:
    """The rules between fields the schema can state (JSON Schema if/then: a pruner needs the
    score objective), and no server field in the dataset's default."""
    schema["if"] = {"properties": {"pruner": {"enum": ["median", "hyperband"]}}, "required": ["pruner"]}
    schema["then"] = {
        "properties": {"objective": {"properties": {"kind": {"const": "score"}}, "required": ["kind"]}},
        "required": ["objective"],
    }
    schema["properties"]["dataset"]["default"].pop("data_root", None)


# What no JSON schema can say; the server answers 422 naming the field.
CHECKED_BEYOND_THE_SCHEMA = (
    "An inline `space` is checked by the search engine (SPSA heads must divide a stage's channels, "
    "known backbones, stems and attentions, ...); `train.warmup_epochs` must be smaller than "
    "`train.epochs`; `dataset.path` must lie under the server's data root (for imagefolder, an "
    "existing directory); `dataset.name` must be detection data (coco, shapes) for a detection "
    "space and classification data otherwise, and `reseed.top_k` must be 0 with detection data "
    "(detectors are not re-trained with more seeds); the per-search quotas of the server are the maxima "
    "below, and the pixels of a batch (image side² × `train.batch_size` or `latency.batch_size`, "
    "the side being `train.image_size` or the space's `input_size`) are capped too. With detection "
    "data the `train` fields left out take the detection recipe, not the defaults shown (epochs 25, "
    "held to the epoch quota; batch_size 8; lr 0.02; warmup_epochs 1 unless epochs is given; "
    "weight_decay 1e-4)."
)


def _json_numbers(value: Any) -> Any:
    """`value` with JSON's view of numbers: 16.0 is the integer 16 (JSON Schema's `integer`
    accepts it; strict validation would not)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _json_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_numbers(item) for item in value]
    return value


def _rest_field(name: str, info: FieldInfo) -> tuple[Any, FieldInfo]:
    annotation = _REST_TYPES.get(name, info.annotation)
    field = FieldInfo.merge_field_infos(info, _REST_FIELDS[name]) if name in _REST_FIELDS else info
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = FieldInfo.merge_field_infos(field, Field(annotation()))  # its own defaults, strict
    return annotation, field


SearchCreate: type[BaseModel] = create_model(
    "SearchCreate",
    __config__=ConfigDict(extra="forbid", frozen=True, strict=True, json_schema_extra=_search_schema),
    __doc__=f"A search to run: SearchConfig's fields but the study name, which the server sets. Only "
    f"what differs from the defaults needs to be given. {CHECKED_BEYOND_THE_SCHEMA}",
    __validators__={"_json_numbers": model_validator(mode="before")(_json_numbers)},
    name=(str | None, Field(None, max_length=128, description="a label of your choice")),
    **{
        name: _rest_field(name, info)
        for name, info in SearchConfig.model_fields.items()
        if name not in SERVER_ONLY
    },
)


# Where each per-search quota is a maximum in the OpenAPI document: (component, property, setting).
PUBLISHED_QUOTAS: tuple[tuple[str, str, str], ...] = (
    ("SearchCreate", "trials", "max_trials"),
    ("TrainConfig", "epochs", "max_epochs"),
    ("SearchCreate", "parallelism", "max_parallelism"),
    ("SearchCreate", "timeout_s", "max_search_s"),
    ("SearchCreate", "max_retries", "max_trial_retries"),
    ("TrainConfig", "image_size", "max_image_size"),
    ("TrainConfig", "num_workers", "max_loader_workers"),
    ("LatencyConfig", "repeats", "max_latency_repeats"),
    ("LatencyConfig", "warmup", "max_latency_warmup"),
    ("LatencyConfig", "min_time_s", "max_latency_min_time_s"),
    ("LatencyConfig", "threads", "max_latency_threads"),
    ("LatencyConfig", "max_time_s", "max_latency_time_s"),
    ("LatencyConfig", "max_warmup_s", "max_latency_warmup_s"),
    ("DatasetCreate", "synthetic_samples", "max_synthetic_samples"),
    ("DatasetCreate", "synthetic_size", "max_image_size"),
    ("DatasetCreate", "shapes_images", "max_synthetic_samples"),
    ("DatasetCreate", "shapes_size", "max_image_size"),
    ("ReseedConfig", "top_k", "max_reseed_top_k"),
    ("ReseedConfig", "seeds", "max_reseed_seeds"),
)


def _cap(schema: dict[str, Any], quota: float) -> None:
    """`quota` as the maximum of a number property (of its number branch when it may be null)."""
    branches = [b for b in schema.get("anyOf", [schema]) if b.get("type") in ("integer", "number")]
    for branch in branches:
        branch["maximum"] = min(branch.get("maximum", quota), quota)


def with_quotas(openapi: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """`openapi` (the app's document) with this server's per-search quotas as the body's maxima,
    so a client sees them before it sends a search over them."""
    components = openapi.get("components", {}).get("schemas", {})
    for model, field, setting in PUBLISHED_QUOTAS:
        _cap(components[model]["properties"][field], getattr(settings, setting))
    return openapi


class PriorityUpdate(BaseModel):
    """An admin's new priority for a search: higher runs first; equal ones are served round-robin
    across their owners."""

    model_config = ConfigDict(extra="forbid", strict=True)

    priority: int = Field(ge=-100, le=100, description="0 by default; higher is served first")

    _numbers = model_validator(mode="before")(_json_numbers)  # 5.0 is 5, as JSON Schema says


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
    phase: Literal["supernet", "candidates", "retrain", "reseed", "done"] | None = Field(
        None, description="oneshot searches: supernet training, candidate evaluation, retraining, done; "
                          "any search: reseed while its top-k are re-trained with more seeds at the end "
                          "(config `reseed`), then what it was")
    supernet: dict[str, Any] | None = Field(
        None, description="oneshot: per supernet (backbone@width) its epoch, epochs and training curve")
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


class RemeasureStatus(BaseModel):
    state: Literal["none", "pending", "running", "done", "failed"] = Field(
        description="none: never asked; pending: asked, not started; running; done; failed (`error`)"
    )
    requested_at: UTCDatetime | None = Field(description="when the pending one was asked for")
    started_at: UTCDatetime | None = Field(description="when a coordinator last took one")
    finished_at: UTCDatetime | None = Field(description="when the last one finished")
    error: str | None = Field(description="why the last one failed")
    count: int = Field(description="re-measurements finished on demand")


class RemeasurePublic(BaseModel):
    search_id: str
    remeasure: RemeasureStatus
    links: dict[str, str] = Field(description="where to watch it (`search`: its `remeasure`) and where "
                                              "the re-measured figures show (`pareto`, `best`, `trials`)")


class SearchPublic(BaseModel):
    id: str
    name: str | None
    owner: str
    status: SearchStatus
    study_name: str
    created_at: UTCDatetime
    started_at: UTCDatetime | None
    finished_at: UTCDatetime | None
    error: str | None
    config: dict[str, Any] = Field(
        description="the full search configuration, defaults included; without the server's data root"
    )
    progress: Progress | None = Field(None, description="trial counts, best so far, timings")
    summary: RunReport | None = Field(None, description="the runner's report once the search ended")
    remeasure: RemeasureStatus | None = Field(
        None, description="the on-demand re-measurement of its finalists (POST .../remeasure)"
    )
    links: Links

    @field_validator("config")
    @classmethod
    def _no_server_paths(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Clients get no server paths: the dataset's `data_root` (set by the server) is left out."""
        dataset = config.get("dataset")
        if isinstance(dataset, dict) and "data_root" in dataset:
            config = {**config, "dataset": {k: v for k, v in dataset.items() if k != "data_root"}}
        return config


class SearchSummary(BaseModel):
    id: str
    name: str | None
    owner: str
    status: SearchStatus
    created_at: UTCDatetime
    finished_at: UTCDatetime | None
    links: Links


class SearchesPublic(BaseModel):
    data: list[SearchSummary]
    count: int


class TrialPublic(BaseModel):
    number: int
    state: TrialStateName
    values: list[float] | None
    params: dict[str, Any]
    metrics: dict[str, Any] = Field(description="val_acc, top1, top5, latency_ms, params, flops, ...; "
                                                "a detector: val_acc is the validation box AP, and "
                                                "ap, ap50, ap75, aps, apm, apl (COCO, test split)")
    spec: dict[str, Any] | None = Field(description="the ArchSpec JSON of the trial's architecture")
    has_weights: bool
    datetime_start: UTCDatetime | None
    datetime_complete: UTCDatetime | None
    duration_s: float | None


class TrialsPublic(BaseModel):
    data: list[TrialPublic]
    count: int


class TiedCandidate(BaseModel):
    trial: int
    val_acc: float | None
    latency_ms: float | None = Field(description="re-measured with the finalists when it was one, else "
                                                 "the first pass (latency_source)")
    latency_ci_ms: list[float] | None = Field(None, description="its confidence interval; None: not recorded")
    latency_source: Literal["remeasured", "first_pass"] | None = None
    val_acc_mean: float | None = Field(None, description="re-trained with more seeds (spsa-nas reseed): "
                                                         "the mean validation accuracy over them")
    val_acc_std: float | None = Field(None, description="and its standard deviation")
    seeds: int | None = Field(None, description="how many seeds; None: one (not re-trained)")


class TiePublic(BaseModel):
    decided: bool = Field(description="False when other candidates are within the noise of the pick")
    chosen: int
    tied: list[TiedCandidate] = Field(description="the pick first, then the candidates tied with it")
    rule: str = Field(description="how the one trial was picked")
    tie_rule: str = Field(description="when two candidates count as tied")
    accuracy_noise: str
    latency_noise: str


class BestPublic(BaseModel):
    trial: int
    spec: dict[str, Any]
    metrics: dict[str, Any]
    values: list[float] | None
    links: dict[str, str]
    tie: TiePublic | None = Field(None, description="whether the pick's lead is beyond the noise of "
                                                    "accuracy and latency; the tied set and the rule")


class CompareCounts(BaseModel):
    summarised: int = Field(description="completed trials with a spec and an accuracy: those in the cells")
    complete_without_metrics: int
    pruned: int
    fail: int
    running: int
    waiting: int


class CompareCell(BaseModel):
    dimension: str = Field(description="spatial_attn, spsa_reverse, spsa_similarity or channel_attn")
    scope: str = Field(description="`stage k`, `any stage` or `every stage` (see `counting`)")
    choice: str
    n: int = Field(description="trials in the cell")
    trials: list[int]
    val_acc_mean: float | None
    val_acc_std: float | None = Field(description="sample standard deviation; null for one trial")
    val_acc_sem: float | None = Field(description="standard error of the mean")
    val_acc_min: float | None
    val_acc_max: float | None
    top1_mean: float | None
    latency_ms_mean: float | None = Field(description="mean of the figure that counts (see `latency`)")
    latency_ms_std: float | None
    latency_first_pass_ms_mean: float | None
    n_remeasured: int = Field(description="trials of the cell whose latency is the finalists' re-measurement")


class ComparePublic(BaseModel):
    search_id: str
    status: str
    finished: bool = Field(description="false: the search is not over; the cells hold its trials "
                                       "completed so far")
    study: str
    accuracy: str = Field(description="what val_acc is: validation accuracy, or box AP for detection")
    counts: CompareCounts
    estimated: int = Field(description="summarised trials whose accuracy is a one-shot (supernet) estimate")
    remeasured_at: str | None = Field(description="when the finalists were last re-measured together")
    counting: str = Field(description="how a trial with mixed choices across stages counts")
    latency: str
    dimensions: dict[str, str]
    cells: list[CompareCell]


class SpacePublic(BaseModel):
    name: str
    space: dict[str, Any]


class SpacesPublic(BaseModel):
    data: list[SpacePublic]
    count: int


class Message(BaseModel):
    detail: str


class FieldProblemPublic(BaseModel):
    loc: list[str | int] = Field(description="where: `body`, then the field's path")
    msg: str
    type: str


class ValidationErrorPublic(BaseModel):
    """A 422: what is wrong with which field."""

    detail: list[FieldProblemPublic]


class Health(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]
