"""A detection search's train fields left open take the detection recipe (config, CLI, REST)."""

from __future__ import annotations

from pathlib import Path

import pytest

from search_spaces.config import DETECTION_TRAIN_DEFAULTS, SearchConfig
from service.api.schemas import SearchCreate
from service.core.settings import Settings
from service.searches.submit import SubmitError, build_config
from spsa_nas.config import TrainConfig
from workers.cli.config_flags import build_config as cli_build_config

SHAPES = {"name": "shapes"}


def _train(config: SearchConfig) -> dict[str, object]:
    return {key: getattr(config.train, key) for key in DETECTION_TRAIN_DEFAULTS}


def test_a_detection_search_without_a_train_section_gets_the_detection_recipe() -> None:
    config = SearchConfig(space="detection_quick", dataset=SHAPES)
    assert _train(config) == DETECTION_TRAIN_DEFAULTS
    # the classifier's defaults are what it had before: 3 epochs of batch 64 (one step an epoch here)
    assert (TrainConfig().epochs, TrainConfig().batch_size) == (3, 64)


def test_a_classification_search_keeps_the_classifier_defaults() -> None:
    config = SearchConfig(space="quick", dataset={"name": "digits"})
    assert config.train == TrainConfig()


@pytest.mark.parametrize("train", [{"epochs": 2, "batch_size": 4}, TrainConfig(epochs=2, batch_size=4)])
def test_given_fields_win_and_a_given_epoch_count_gets_no_default_warmup(train: object) -> None:
    config = SearchConfig(space="detection_quick", dataset=SHAPES, train=train)
    assert (config.train.epochs, config.train.batch_size) == (2, 4)
    assert config.train.lr == DETECTION_TRAIN_DEFAULTS["lr"]
    assert config.train.warmup_epochs == 0  # a warm-up epoch of a 2-epoch run was not asked for


def test_one_epoch_asked_for_is_valid() -> None:
    config = SearchConfig(space="detection_quick", dataset=SHAPES, train={"epochs": 1})
    assert (config.train.epochs, config.train.warmup_epochs) == (1, 0)


def test_the_stored_config_round_trips_unchanged() -> None:
    config = SearchConfig(space="detection_quick", dataset=SHAPES, train={"lr": 0.01})
    again = SearchConfig.model_validate_json(config.model_dump_json())
    assert again == config and again.train.lr == 0.01 and again.train.epochs == 25


def test_the_cli_gets_the_recipe_and_its_flags_win() -> None:
    config = cli_build_config({"space": "detection_quick", "dataset": SHAPES, "train": {"batch_size": 2}})
    assert (config.train.batch_size, config.train.epochs, config.train.lr) == (2, 25, 0.02)


def test_rest_applies_the_recipe_and_holds_a_default_to_the_epoch_quota(tmp_path: Path) -> None:
    body = SearchCreate.model_validate({"space": "detection_quick", "dataset": SHAPES})
    config = build_config(body, settings=Settings(data_dir=tmp_path), study_name="s")
    assert _train(config) == DETECTION_TRAIN_DEFAULTS
    # a server allowing 5 epochs: the default becomes 5, never a refusal of what the user did not ask
    capped = build_config(body, settings=Settings(data_dir=tmp_path, max_epochs=5), study_name="s")
    assert (capped.train.epochs, capped.train.warmup_epochs) == (5, 1)
    one = build_config(body, settings=Settings(data_dir=tmp_path, max_epochs=1), study_name="s")
    assert (one.train.epochs, one.train.warmup_epochs) == (1, 0)


def test_rest_checks_the_quota_on_the_recipe_it_will_run(tmp_path: Path) -> None:
    # 96 px (the space's input) x batch 8 of the recipe fits; a server whose pixel cap is below it refuses
    body = SearchCreate.model_validate({"space": "detection_quick", "dataset": SHAPES})
    with pytest.raises(SubmitError) as caught:
        build_config(body, settings=Settings(data_dir=tmp_path, max_batch_pixels=96 * 96 * 4), study_name="s")
    assert [p.loc for p in caught.value.problems] == [("train", "batch_size")]
    given = SearchCreate.model_validate({"space": "detection_quick", "dataset": SHAPES,
                                         "train": {"epochs": 1, "batch_size": 4}})
    config = build_config(given, settings=Settings(data_dir=tmp_path, max_batch_pixels=96 * 96 * 4),
                          study_name="s")
    assert (config.train.epochs, config.train.batch_size, config.train.lr) == (1, 4, 0.02)
