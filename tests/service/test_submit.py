"""service.searches.submit: a client's body becomes a SearchConfig, or a SubmitError (no HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from search_spaces.config import STUDY_NAME_RE
from service.api.schemas import SearchCreate
from service.core.settings import Settings
from service.searches.submit import SubmitError, build_config, study_name_for


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, max_trials=10, max_epochs=3, max_parallelism=2)


def test_the_config_gets_the_study_name_and_the_data_root(settings: Settings) -> None:
    config = build_config(SearchCreate(trials=3), settings=settings, study_name="s-1")
    assert config.study_name == "s-1" and config.trials == 3
    assert config.dataset.data_root == str(settings.data_root_path)


def test_problems_are_a_domain_error_naming_the_fields(settings: Settings) -> None:
    body = SearchCreate.model_validate({"trials": 11, "train": {"epochs": 4}, "parallelism": 3})
    with pytest.raises(SubmitError) as info:
        build_config(body, settings=settings, study_name="s")
    assert [p.loc for p in info.value.problems] == [("trials",), ("train", "epochs"), ("parallelism",)]
    assert {p.type for p in info.value.problems} == {"quota_exceeded"}
    assert "trials: 11 trials exceed this server's quota of 10" in str(info.value)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"space": "nope"}, ("space",)),
        ({"dataset": {"name": "imagefolder"}}, ("dataset", "path")),
        ({"dataset": {"name": "imagefolder", "path": "../x"}}, ("dataset", "path")),
        ({"pruner": "median"}, ()),  # SearchConfig's own rule, relayed
    ],
)
def test_each_refusal_names_its_field(settings: Settings, body: dict, loc: tuple) -> None:
    with pytest.raises(SubmitError) as info:
        build_config(SearchCreate.model_validate(body), settings=settings, study_name="s")
    assert loc in [p.loc for p in info.value.problems]


@pytest.mark.parametrize(
    ("owner", "space", "dataset", "expected"),
    [
        ("alice", "quick", "digits", "alice-quick-digits-1a2b3c4d"),
        ("bob@example.org", {"name": "mine"}, "cifar10", "bob-example.org-mine-cifar10-1a2b3c4d"),
        ("carol", {"backbone": "resnet18"}, "synthetic", "carol-inline-synthetic-1a2b3c4d"),
        ("d" * 64, "x" * 64, "imagefolder", f"{'d' * 32}-{'x' * 32}-imagefolder-1a2b3c4d"),
        ("e", {"name": "../../etc"}, "digits", "e-etc-digits-1a2b3c4d"),
    ],
)
def test_study_names_a_person_recognises(owner: str, space: object, dataset: str, expected: str) -> None:
    name = study_name_for(
        owner=owner, space=space, dataset=dataset, search_id="1a2b3c4d-0000-4000-8000-000000000000"
    )
    assert name == expected and STUDY_NAME_RE.match(name)


def test_submit_knows_nothing_of_http() -> None:
    import service.searches.submit as submit

    source = Path(submit.__file__).read_text()
    assert "fastapi" not in source and "service.api.errors" not in source
