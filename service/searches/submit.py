"""Turn a client's SearchCreate into the SearchConfig the runners get: spaces, data root, quotas."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from optuna.storages import BaseStorage
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from search_spaces.config import STUDY_NAME_RE, SearchConfig, detection_train_defaults
from search_spaces.loading import builtin_spaces, load_space
from search_spaces.space import SearchSpace, SpaceError
from service.api.schemas import SearchCreate
from service.core.models import ACTIVE_STATES, QUEUED, User
from service.core.paths import PathError, confine
from service.core.settings import Settings
from service.crud.searches import count_searches, owned_study_names
from service.searches import retention
from spsa_nas.config import DETECTION_DATASETS
from spsa_nas.errors import FieldProblem, field_problems

PATH_DATASETS = ("imagefolder", "cifar10", "cifar100")


class SubmitError(ValueError):
    """A search this server will not run; `problems` name the fields of the search (`loc`
    relative to its settings, e.g. `("train", "epochs")`) and what is wrong with each."""

    def __init__(self, problems: Sequence[FieldProblem]) -> None:
        super().__init__("; ".join(f"{p.dotted}: {p.msg}" for p in problems))
        self.problems = list(problems)


class AdmissionError(Exception):
    """A search refused for its owner's or the server's state, not its fields: `status_code` 429
    (a per-user quota) or 507 (the disk is nearly full); the message says the limit and setting."""

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


def study_name_for(*, owner: str, space: str | dict[str, Any], dataset: str, search_id: str) -> str:
    """The study's name a person recognises in optuna-dashboard: `alice-quick-digits-1a2b3c4d`
    (owner, space, dataset, the search id's first 8 hex digits), within STUDY_NAME_RE."""
    space_name = space if isinstance(space, str) else space.get("name")
    parts = [owner, space_name if isinstance(space_name, str) else "inline", dataset]
    # letters, digits and _ . only (`@` of an e-mail-like owner becomes -), 32 characters each
    words = [re.sub(r"[^A-Za-z0-9_.]+", "-", part).strip("-._")[:32] or "x" for part in parts]
    name = "-".join([*words, search_id.replace("-", "")[:8]])
    if not STUDY_NAME_RE.match(name):  # unreachable by construction; never hand Optuna a bad name
        raise ValueError(f"study name {name!r} does not match {STUDY_NAME_RE.pattern}")
    return name


# Per-search quotas: the field's path in the body, the setting that caps it, what is over it.
PER_SEARCH_QUOTAS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("trials",), "max_trials", "{v} trials exceed this server's quota of {q} per search"),
    (("train", "epochs"), "max_epochs", "{v} epochs exceed this server's quota of {q} per trial"),
    (
        ("parallelism",),
        "max_parallelism",
        "parallelism {v} exceeds this server's quota of {q} trials in flight",
    ),
    (("timeout_s",), "max_search_s", "timeout_s {v} exceeds this server's quota of {q} s per search"),
    (("max_retries",), "max_trial_retries", "max_retries {v} exceeds this server's quota of {q}"),
    (("train", "image_size"), "max_image_size", "image_size {v} exceeds this server's quota of {q} pixels"),
    (("train", "num_workers"), "max_loader_workers", "num_workers {v} exceeds this server's quota of {q}"),
    (("latency", "repeats"), "max_latency_repeats", "repeats {v} exceed this server's quota of {q}"),
    (("latency", "warmup"), "max_latency_warmup", "warmup {v} exceeds this server's quota of {q} runs"),
    (
        ("latency", "min_time_s"),
        "max_latency_min_time_s",
        "min_time_s {v} exceeds this server's quota of {q} s",
    ),
    (("latency", "threads"), "max_latency_threads", "threads {v} exceed this server's quota of {q}"),
    (("latency", "max_time_s"), "max_latency_time_s", "max_time_s {v} exceeds this server's quota of {q} s"),
    (
        ("latency", "max_warmup_s"),
        "max_latency_warmup_s",
        "max_warmup_s {v} exceeds this server's quota of {q} s",
    ),
    (
        ("dataset", "synthetic_samples"),
        "max_synthetic_samples",
        "synthetic_samples {v} exceed this server's quota of {q}",
    ),
    (
        ("dataset", "synthetic_size"),
        "max_image_size",
        "synthetic_size {v} exceeds this server's quota of {q} pixels",
    ),
    (
        ("dataset", "shapes_images"),
        "max_synthetic_samples",
        "shapes_images {v} exceed this server's quota of {q}",
    ),
    (
        ("dataset", "shapes_size"),
        "max_image_size",
        "shapes_size {v} exceeds this server's quota of {q} pixels",
    ),
    (("reseed", "top_k"), "max_reseed_top_k", "top_k {v} exceeds this server's quota of {q} trials"),
    (("reseed", "seeds"), "max_reseed_seeds", "seeds {v} exceed this server's quota of {q} per trial"),
)


def _over(loc: tuple[str, ...], setting: str, message: str) -> FieldProblem:
    """A quota refusal naming the field (`loc`), the limit and the variable that raises it."""
    return FieldProblem(
        loc, f"{message} (the operator raises it with SPSA_NAS_{setting.upper()})", "quota_exceeded"
    )


def _number(value: float) -> str:
    """16777216, not 1.67772e+07; 0.5 stays 0.5."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _field(body: BaseModel, loc: tuple[str, ...]) -> Any:
    value: Any = body
    for name in loc:
        value = getattr(value, name)
    return value


def _space_of(body: SearchCreate) -> SearchSpace | None:
    """The search's space (None when it is unknown or invalid: check_space names the problem)."""
    if isinstance(body.space, str):
        return builtin_spaces().get(body.space)
    try:
        return load_space(body.space, source="space")
    except SpaceError:
        return None


def check_quotas(body: SearchCreate, settings: Settings) -> None:
    """The per-search quotas (budgets, retries, image and batch size, dataset size, latency protocol,
    loader threads): SubmitError naming every field over its quota and the setting that raises it."""
    problems: list[FieldProblem] = []
    for loc, setting, message in PER_SEARCH_QUOTAS:
        value, quota = _field(body, loc), getattr(settings, setting)
        if value is not None and value > quota:
            problems.append(_over(loc, setting, message.format(v=_number(value), q=_number(quota))))
    problems += _batch_memory(body, settings)
    if problems:
        raise SubmitError(problems)


def _batch_memory(body: SearchCreate, settings: Settings) -> list[FieldProblem]:
    """The image side (train.image_size, else the space's input_size) within max_image_size, and
    side² × batch size of a training and of a latency batch within max_batch_pixels."""
    space = _space_of(body)
    side = body.train.image_size or (space.input_size if space is not None else None)
    if side is None:
        return []
    problems = []
    if body.train.image_size is None and side > settings.max_image_size:
        message = (
            f"the space's input_size {side} exceeds this server's quota of {settings.max_image_size} pixels"
        )
        problems.append(_over(("space",), "max_image_size", message))
    for loc in (("train", "batch_size"), ("latency", "batch_size")):
        batch = _field(body, loc)
        if side * side * batch > settings.max_batch_pixels:
            message = (
                f"batch_size {batch} of {side}x{side} images is {side * side * batch} pixels, over this "
                f"server's quota of {settings.max_batch_pixels} pixels a batch (image side² × batch size)"
            )
            problems.append(_over(loc, "max_batch_pixels", message))
    return problems


def check_resources(body: SearchCreate, cluster: Mapping[str, float] | None) -> None:
    """A trial's `resources` within what the cluster has in all (`cluster`: Ray's resource totals,
    e.g. {"CPU": 16, "GPU": 0}); nothing is checked while they are unknown (None)."""
    if cluster is None:
        return
    problems = []
    wanted = (
        ("num_gpus", "GPU", 1.0, "GPUs"),
        ("num_cpus", "CPU", 1.0, "CPUs"),
        ("memory_gb", "memory", 2**30, "GB of memory"),
    )
    for field, key, unit, what in wanted:
        asked = getattr(body.resources, field)
        if asked is None or (key == "memory" and key not in cluster):
            continue
        has = float(cluster.get(key, 0.0)) / unit
        if asked > has:
            problems.append(
                FieldProblem(
                    ("resources", field),
                    f"{field} {asked:g} per trial: the cluster has {has:g} {what} in all, so the "
                    "trial could never start",
                    "resources_unavailable",
                )
            )
    if problems:
        raise SubmitError(problems)


def check_space(body: SearchCreate) -> None:
    """A built-in name (never a server file path) or a valid inline space."""
    if isinstance(body.space, str):
        names = builtin_spaces()
        if body.space not in names:
            message = (
                f"unknown built-in space {body.space!r}; valid: "
                f"{', '.join(names)} (or give an inline space object)"
            )
            raise SubmitError([FieldProblem(("space",), message)])
        space = load_space(body.space)
    else:
        try:
            space = load_space(body.space, source="space")
        except SpaceError as exc:
            raise SubmitError(
                [FieldProblem(("space",), problem, "space_error") for problem in exc.problems]
            ) from None
    if (space.task == "detection") != (body.dataset.name in DETECTION_DATASETS):
        detection = f"detection data ({', '.join(DETECTION_DATASETS)})"
        kind = detection if space.task == "detection" else "classification data"
        message = f"space {space.name!r} is a {space.task} space: it needs {kind}, not {body.dataset.name!r}"
        raise SubmitError([FieldProblem(("dataset", "name"), message)])


def _with_detection_recipe(body: SearchCreate, settings: Settings) -> SearchCreate:
    """`body` with the detection training recipe (search_spaces.config.DETECTION_TRAIN_DEFAULTS) in
    the `train` fields it leaves open, so that the quotas check what will run; a default epoch count
    is held to `max_epochs` (a default is never what a quota refuses; no warm-up if 1 epoch is left)."""
    given = body.train.model_dump(exclude_unset=True)
    recipe = {k: v for k, v in detection_train_defaults(given).items() if k not in given}
    if recipe.get("epochs", 0) > settings.max_epochs:
        recipe["epochs"] = settings.max_epochs
        if recipe.get("warmup_epochs", 0) >= recipe["epochs"]:
            recipe.pop("warmup_epochs")
    return body.model_copy(update={"train": body.train.model_copy(update=recipe)})


def build_config(
    body: SearchCreate,
    *,
    settings: Settings,
    study_name: str,
    cluster: Mapping[str, float] | None = None,
) -> SearchConfig:
    """The SearchConfig of a new search, or SubmitError naming the fields that are wrong
    (`cluster`: the cluster's resource totals when known, see check_resources)."""
    if body.dataset.name in DETECTION_DATASETS:
        body = _with_detection_recipe(body, settings)
    check_quotas(body, settings)
    check_resources(body, cluster)
    check_space(body)
    dataset = body.dataset.model_dump(exclude={"data_root"})
    if body.dataset.path is not None:
        try:
            dataset["path"] = confine(
                body.dataset.path, settings.data_root_path,
                must_exist=body.dataset.name in ("imagefolder", "coco"),
            )
        except PathError as exc:
            raise SubmitError([FieldProblem(("dataset", "path"), str(exc), "path_error")]) from None
    elif body.dataset.name in ("imagefolder", "coco"):
        message = f"{body.dataset.name} needs a path relative to the server's data root"
        raise SubmitError([FieldProblem(("dataset", "path"), message)])
    dataset["data_root"] = str(settings.data_root_path)
    fields = body.model_dump(exclude={"name", "dataset"})
    if fields.get("timeout_s") is None:  # every search ends: the server's maximum when absent
        fields["timeout_s"] = settings.max_search_s
    try:
        return SearchConfig.model_validate({**fields, "dataset": dataset, "study_name": study_name})
    except ValidationError as exc:
        raise SubmitError(field_problems(exc)) from None


def check_admission(session: Session, *, user: User, settings: Settings, storage: BaseStorage) -> None:
    """Whether `user` may queue one more search now: AdmissionError (429) over a per-user quota (searches
    active, queued; bytes of artifacts), AdmissionError (507) when the disk is nearly full."""
    active = count_searches(session, owner_id=user.id, states=ACTIVE_STATES)
    if active >= settings.max_active_searches_per_user:
        raise AdmissionError(
            f"you have {active} searches queued or running; this server allows "
            f"{settings.max_active_searches_per_user} per user (SPSA_NAS_MAX_ACTIVE_SEARCHES_PER_USER): "
            "wait or cancel one",
            status_code=429,
        )
    queued_cap = settings.max_queued_searches_per_user
    queued = count_searches(session, owner_id=user.id, states=(QUEUED,))
    if queued >= queued_cap:
        raise AdmissionError(
            f"you have {queued} searches queued; this server allows {queued_cap} queued per user "
            "(SPSA_NAS_MAX_QUEUED_SEARCHES_PER_USER): wait for one to start or cancel one",
            status_code=429,
        )
    low = retention.low_disk(settings)
    if low is not None:
        raise AdmissionError(low, status_code=507)
    quota = settings.max_artifact_bytes_per_user
    used = retention.artifact_bytes(
        storage, owned_study_names(session, user=user), artifact_dir=settings.artifact_path
    )
    if used > quota:
        raise AdmissionError(
            f"your searches' weights and ONNX files take {used} bytes, over this server's quota of "
            f"{quota} bytes per user (SPSA_NAS_MAX_ARTIFACT_BYTES_PER_USER): ask an admin to remove "
            "old searches' files",
            status_code=429,
        )
