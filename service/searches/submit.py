"""Turn a client's SearchCreate into the SearchConfig the runners get: spaces, data root, quotas."""

from __future__ import annotations

from pydantic import ValidationError

from search_spaces.config import SearchConfig
from search_spaces.space import SpaceError, builtin_spaces, load_space
from service.api.errors import FieldError
from service.api.schemas import SearchCreate
from service.core.paths import PathError, confine
from service.core.settings import Settings

PATH_DATASETS = ("imagefolder", "cifar10", "cifar100")


def check_quotas(body: SearchCreate, settings: Settings) -> None:
    errors: list[tuple[tuple[str, ...], str]] = []
    if body.trials > settings.max_trials:
        errors.append(
            (
                ("body", "trials"),
                f"{body.trials} trials exceed this server's quota of {settings.max_trials} per search",
            )
        )
    if body.train.epochs > settings.max_epochs:
        errors.append(
            (
                ("body", "train", "epochs"),
                f"{body.train.epochs} epochs exceed this server's quota of {settings.max_epochs} per trial",
            )
        )
    if body.parallelism > settings.max_parallelism:
        errors.append(
            (
                ("body", "parallelism"),
                f"parallelism {body.parallelism} exceeds this server's "
                f"quota of {settings.max_parallelism} trials in flight",
            )
        )
    if errors:
        raise FieldError(errors, kind="quota_exceeded")


def check_space(body: SearchCreate) -> None:
    """A built-in name (never a server file path) or a valid inline space."""
    if isinstance(body.space, str):
        names = builtin_spaces()
        if body.space not in names:
            raise FieldError(
                [
                    (
                        ("body", "space"),
                        f"unknown built-in space {body.space!r}; valid: "
                        f"{', '.join(names)} (or give an inline space object)",
                    )
                ]
            )
        return
    try:
        load_space(body.space, source="space")
    except SpaceError as exc:
        raise FieldError(
            [(("body", "space"), problem) for problem in exc.problems], kind="space_error"
        ) from None


def build_config(body: SearchCreate, *, settings: Settings, study_name: str) -> SearchConfig:
    """The SearchConfig of a new search, or FieldError naming the field that is wrong."""
    check_quotas(body, settings)
    check_space(body)
    dataset = body.dataset.model_dump(exclude={"data_root"})
    if body.dataset.path is not None:
        try:
            dataset["path"] = confine(
                body.dataset.path, settings.data_root_path, must_exist=body.dataset.name == "imagefolder"
            )
        except PathError as exc:
            raise FieldError([(("body", "dataset", "path"), str(exc))], kind="path_error") from None
    elif body.dataset.name == "imagefolder":
        raise FieldError(
            [(("body", "dataset", "path"), "imagefolder needs a path relative to the server's data root")]
        )
    dataset["data_root"] = str(settings.data_root_path)
    fields = body.model_dump(exclude={"name", "dataset"})
    try:
        return SearchConfig.model_validate({**fields, "dataset": dataset, "study_name": study_name})
    except ValidationError as exc:
        raise FieldError([(("body", *err["loc"]), err["msg"]) for err in exc.errors()]) from None
