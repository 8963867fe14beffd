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


def test_spatial_ablation_parameter_names_and_specs() -> None:
    space = builtin_spaces()["spatial_ablation"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    names: set[str] = set()
    seen: set[str] = set()
    switches: set[tuple[bool, str]] = set()
    for _ in range(60):
        trial = study.ask()
        spec = suggest_arch(trial, space, num_classes=10, in_channels=1)
        params = trial.params
        names |= set(params)
        for number, stage in enumerate(spec.stages, start=1):
            choice = params[f"s{number}.spatial"]
            assert stage.spatial == choice
            seen.add(choice)
            assert stage.spatial_attn == (choice if choice in ("nonlocal", "gc") else "none")
            if choice == "spsa":
                assert stage.spsa_reverse == params[f"s{number}.reverse"]
                assert stage.spsa_similarity == params[f"s{number}.similarity"]
                switches.add((stage.spsa_reverse, stage.spsa_similarity))
            else:  # no phantom choices: the switches are neither suggested nor set
                assert f"s{number}.reverse" not in params and f"s{number}.similarity" not in params
                assert stage.spsa_reverse and stage.spsa_similarity == "correlation"
        study.tell(trial, 1.0)
    assert names == {f"s{n}.{p}" for n in range(1, 5) for p in ("spatial", "reverse", "similarity")}
    assert seen == {"none", "spsa", "nonlocal", "gc"}
    assert switches == {(True, "correlation"), (False, "correlation"), (True, "cosine"), (False, "cosine")}
    dists = study.trials[-1].distributions
    assert dists["s1.spatial"] == optuna.distributions.CategoricalDistribution(
        ["none", "spsa", "nonlocal", "gc"])


def test_attn_order_is_suggested_beside_a_non_local_or_gc_block() -> None:
    space = load_space({"name": "s", "backbone": "resnet18", "stem": "cifar", "input_size": 16,
                        "width": 0.25, "strategies": ["standalone"],
                        "all_stages": {"spatial": ["gc"], "channel_attn": ["se"],
                                       "attn_order": ["channel_first", "spsa_first"]}})
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    spec = suggest_arch(trial, space, num_classes=10, in_channels=3)
    assert set(trial.params) == {f"s{n}.attn_order" for n in range(1, 5)}  # spatial: one value
    assert all(s.spatial_attn == "gc" and s.attn_order == trial.params[f"s{n}.attn_order"]
               for n, s in enumerate(spec.stages, start=1))


@pytest.mark.parametrize("name", ["quick", "resnet18_cifar", "mobilenet_v2", "shufflenet_v2",
                                  "resnet50_imagenet"])
def test_existing_spaces_keep_their_parameters_and_distributions(name: str) -> None:
    """Stored studies resume only if a space suggests the same names with the same distributions."""
    space = builtin_spaces()[name]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for _ in range(40):
        trial = study.ask()
        suggest_arch(trial, space, num_classes=10, in_channels=3)
        dists.update(trial.distributions)
        study.tell(trial, 1.0)
    for param, dist in dists.items():
        stage, _, field = param.partition(".")
        assert field in ("spsa", "heads", "alpha", "channel_attn", "attn_order") or param in (
            "backbone", "width"), param
        if field == "spsa":
            assert dist == optuna.distributions.CategoricalDistribution([False, True])
        choices = space.stage_choices(space.backbones[0])
        if field == "channel_attn" and len(space.backbones) == 1:
            assert dist == optuna.distributions.CategoricalDistribution(
                choices[int(stage[1:]) - 1].choices.channel_attn)
