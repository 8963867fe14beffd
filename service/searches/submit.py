"""Turn a client's SearchCreate into the SearchConfig the runners get: spaces, data root, quotas."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from search_spaces.config import STUDY_NAME_RE, SearchConfig
from search_spaces.loading import builtin_spaces, load_space
from search_spaces.space import SpaceError
from service.api.schemas import SearchCreate
from service.core.paths import PathError, confine
from service.core.settings import Settings
from spsa_nas.errors import FieldProblem, field_problems

PATH_DATASETS = ("imagefolder", "cifar10", "cifar100")


class SubmitError(ValueError):
    """A search this server will not run; `problems` name the fields of the search (`loc`
    relative to its settings, e.g. `("train", "epochs")`) and what is wrong with each."""

    def __init__(self, problems: Sequence[FieldProblem]) -> None:
        super().__init__("; ".join(f"{p.dotted}: {p.msg}" for p in problems))
        self.problems = list(problems)


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


def check_quotas(body: SearchCreate, settings: Settings) -> None:
    quota = "quota_exceeded"
    problems: list[FieldProblem] = []
    if body.trials > settings.max_trials:
        problems.append(
            FieldProblem(
                ("trials",),
                f"{body.trials} trials exceed this server's quota of {settings.max_trials} per search",
                quota,
            )
        )
    if body.train.epochs > settings.max_epochs:
        problems.append(
            FieldProblem(
                ("train", "epochs"),
                f"{body.train.epochs} epochs exceed this server's quota of {settings.max_epochs} per trial",
                quota,
            )
        )
    if body.parallelism > settings.max_parallelism:
        problems.append(
            FieldProblem(
                ("parallelism",),
                f"parallelism {body.parallelism} exceeds this server's "
                f"quota of {settings.max_parallelism} trials in flight",
                quota,
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
        return
    try:
        load_space(body.space, source="space")
    except SpaceError as exc:
        raise SubmitError(
            [FieldProblem(("space",), problem, "space_error") for problem in exc.problems]
        ) from None


def build_config(body: SearchCreate, *, settings: Settings, study_name: str) -> SearchConfig:
    """The SearchConfig of a new search, or SubmitError naming the fields that are wrong."""
    check_quotas(body, settings)
    check_space(body)
    dataset = body.dataset.model_dump(exclude={"data_root"})
    if body.dataset.path is not None:
        try:
            dataset["path"] = confine(
                body.dataset.path, settings.data_root_path, must_exist=body.dataset.name == "imagefolder"
            )
        except PathError as exc:
            raise SubmitError([FieldProblem(("dataset", "path"), str(exc), "path_error")]) from None
    elif body.dataset.name == "imagefolder":
        message = "imagefolder needs a path relative to the server's data root"
        raise SubmitError([FieldProblem(("dataset", "path"), message)])
    dataset["data_root"] = str(settings.data_root_path)
    fields = body.model_dump(exclude={"name", "dataset"})
    try:
        return SearchConfig.model_validate({**fields, "dataset": dataset, "study_name": study_name})
    except ValidationError as exc:
        raise SubmitError(field_problems(exc)) from None
