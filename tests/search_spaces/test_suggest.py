"""suggest_arch with Optuna's real samplers: valid specs, stable names, conditional parameters."""

from __future__ import annotations

import optuna
import pytest

from search_spaces.loading import builtin_spaces, load_space
from search_spaces.suggest import suggest_arch
from spsa_nas.spec import ArchSpec, stage_table


@pytest.mark.parametrize("name", sorted(builtin_spaces()))
def test_random_trials_give_valid_specs(name: str) -> None:
    space = builtin_spaces()[name]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1),
                                directions=["maximize", "minimize"])
    seen_spsa, seen_off = False, False
    for _ in range(60):
        trial = study.ask()
        spec = suggest_arch(trial, space, num_classes=10, in_channels=3)
        assert isinstance(spec, ArchSpec)
        assert ArchSpec.model_validate_json(spec.model_dump_json()) == spec
        assert spec.backbone in space.backbones and spec.width in space.widths
        assert spec.input_size == space.input_size and spec.stem == space.stem
        for number, (stage, info) in enumerate(zip(spec.stages, stage_table(spec.backbone, spec.width),
                                                   strict=True), start=1):
            params = trial.params
            if stage.spsa:
                seen_spsa = True
                assert info.channels % stage.spsa_heads == 0
                if len(space.stage_choices(spec.backbone)[number - 1].choices.heads) > 1:
                    assert params[f"s{number}.heads"] == stage.spsa_heads
            else:
                seen_off = True
                assert f"s{number}.heads" not in params and f"s{number}.alpha" not in params
                assert f"s{number}.attn_order" not in params
        study.tell(trial, [0.5, 1.0])
    assert seen_spsa and seen_off


def test_parameter_names_and_alpha_range() -> None:
    space = builtin_spaces()["resnet18_cifar"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    names: set[str] = set()
    for _ in range(40):
        trial = study.ask()
        spec = suggest_arch(trial, space, num_classes=10)
        names |= set(trial.params)
        for number, stage in enumerate(spec.stages, start=1):
            if stage.spsa:
                assert 0.25 <= trial.params[f"s{number}.alpha"] <= 4
                assert stage.spsa_alpha == trial.params[f"s{number}.alpha"]
        study.tell(trial, 1.0)
    expected = {f"s{n}.{p}" for n in range(1, 5)
                for p in ("spsa", "heads", "alpha", "channel_attn", "attn_order")}
    assert names == expected  # width/backbone are fixed in this space, so not suggested


def test_one_by_one_stage_is_never_searched() -> None:
    space = load_space({"name": "s", "backbone": "resnet18", "input_size": 32,
                        "all_stages": {"spsa": [False, True], "heads": [1, 2]}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        spec = suggest_arch(trial, space, num_classes=10, in_channels=3)
        assert not spec.stages[3].spsa and "s4.spsa" not in trial.params
        study.tell(trial, 1.0)


def test_io_from_the_dataset_or_the_space() -> None:
    space = load_space({"name": "s", "backbone": "resnet18", "stem": "cifar", "input_size": 16,
                        "width": 0.25, "num_classes": 10, "all_stages": {}})
    trial = optuna.create_study().ask()
    assert suggest_arch(trial, space, in_channels=1).num_classes == 10
    with pytest.raises(ValueError, match="fixes num_classes=10 but the dataset has 4"):
        suggest_arch(optuna.create_study().ask(), space, num_classes=4, in_channels=1)
    with pytest.raises(ValueError, match="in_channels"):
        suggest_arch(optuna.create_study().ask(), space)
