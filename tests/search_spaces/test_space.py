"""Search-space YAML: the schema's errors name file, line, field and valid values; the 1x1 rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from search_spaces.loading import builtin_spaces, load_space
from search_spaces.space import SearchSpace, SpaceError
from spsa_nas.spec import CHANNEL_ATTENTIONS, feature_sizes

GOOD = """\
name: tiny
backbone: resnet18
stem: cifar
input_size: 16
width: 0.25
all_stages:
  spsa: [false, true]
  heads: [1, 2]
  alpha: [0.5, 1]
  channel_attn: [none, se]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_good_space_loads(tmp_path: Path) -> None:
    space = load_space(_write(tmp_path, GOOD))
    assert space.name == "tiny"
    assert space.backbones == ("resnet18",)
    assert space.notes == []
    # per stage: spsa off (2 attns) + spsa on (2 heads x 2 alphas x 2 attns) = 10; 4 stages
    assert space.size() == 10**4


def test_heads_that_do_not_divide_name_line_field_and_valid_heads(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("heads: [1, 2]", "heads: [1, 3]"))
    assert ":8:" in message  # the heads line
    assert "all_stages.heads.1" in message
    assert "16 channels" in message and "width 0.25" in message
    assert "valid heads: 1, 2, 4, 8" in message


def test_heads_checked_at_every_width(tmp_path: Path) -> None:
    # 16 heads divide 32 channels (width 0.5) but leave 1 channel per head at width 0.25
    text = GOOD.replace("width: 0.25", "width: [0.5, 0.25]").replace("heads: [1, 2]", "heads: [16]")
    message = _error(tmp_path, text)
    assert "all_stages.heads.0" in message and "width 0.25" in message


def test_unknown_attention_lists_valid_names(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("[none, se]", "[none, squeeze]"))
    assert ":10:" in message and "all_stages.channel_attn.1" in message
    assert "'squeeze'" in message
    for name in CHANNEL_ATTENTIONS:
        assert name in message


def test_unknown_backbone_lists_valid_ones(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("backbone: resnet18", "backbone: resnet19"))
    assert ":2:" in message and "backbone" in message
    assert "resnet18" in message and "mobilenet_v2" in message


def test_wrong_stage_count_names_the_stages(tmp_path: Path) -> None:
    text = GOOD.split("all_stages:")[0] + "stages:\n  - {spsa: [true]}\n  - {}\n  - {}\n"
    message = _error(tmp_path, text)
    assert ":6:" in message and "stages:" in message
    assert "resnet18 has 4 stages (layer1, layer2, layer3, layer4), got 3" in message


def test_alpha_out_of_range_in_set_and_range(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("alpha: [0.5, 1]", "alpha: [0.5, 12]"))
    assert ":9:" in message and "all_stages.alpha.1" in message and "(0, 10]" in message
    text = GOOD.replace("alpha: [0.5, 1]", "alpha:\n    low: 0\n    high: 2")
    message = _error(tmp_path, text)
    assert ":10:" in message and "all_stages.alpha.low" in message and "(0, 10]" in message


def test_unknown_field_in_a_stage_override_lists_fields(tmp_path: Path) -> None:
    text = GOOD + "stages:\n  3:\n    hedas: [2]\n"
    message = _error(tmp_path, text)
    assert ":13:" in message and "stages.3.hedas" in message
    assert ("valid: alpha, attn_order, channel_attn, heads, spatial, spsa, spsa_reverse, "
            "spsa_similarity") in message


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("heads: [1, 2]", "heads: [1, 2"))
    assert "not valid YAML" in message and ":9" in message


def test_stage_overrides_merge_over_the_template(tmp_path: Path) -> None:
    text = GOOD + "stages:\n  2: {channel_attn: [eca], heads: [4]}\n"
    space = load_space(_write(tmp_path, text))
    stages = space.stage_choices("resnet18")
    assert stages[1].choices.channel_attn == ["eca"] and stages[1].choices.heads == [4]
    assert stages[1].choices.alpha == [0.5, 1]  # from the template
    assert stages[0].choices.channel_attn == ["none", "se"]


def test_one_by_one_stage_is_noted_and_spsa_forced_off() -> None:
    # ImageNet stem at 32x32: 8, 8, 4, 2, 1 -> resnet18's layer4 sees a 1x1 map
    assert feature_sizes("resnet18", "imagenet", 32)[-1] == 1
    space = load_space({"name": "small", "backbone": "resnet18", "input_size": 32,
                        "all_stages": {"spsa": [False, True]}})
    assert len(space.notes) == 1
    assert "stage 4 (layer4) is 1x1" in space.notes[0] and "constant gate" in space.notes[0]
    stages = space.stage_choices("resnet18")
    assert stages[3].choices.spsa == [False]
    assert stages[2].choices.spsa == [False, True]


def test_choice_of_backbones_with_different_stage_counts() -> None:
    space = load_space({"name": "mix", "backbone": ["resnet18", "mobilenet_v2"], "input_size": 64,
                        "all_stages": {"heads": [1, 2]}})
    assert len(space.stage_choices("resnet18")) == 4
    assert len(space.stage_choices("mobilenet_v2")) == 7
    with pytest.raises(SpaceError, match="mobilenet_v2 has 7 stages"):
        load_space({"name": "mix", "backbone": ["resnet18", "mobilenet_v2"], "input_size": 64,
                    "stages": [{}, {}, {}, {}]})


def test_builtin_spaces() -> None:
    spaces = builtin_spaces()
    assert {"quick", "resnet50_imagenet", "resnet18_cifar", "mobilenet_v2", "shufflenet_v2",
            "detection_quick", "spatial_ablation"} <= set(spaces)
    for name, space in spaces.items():
        assert isinstance(space, SearchSpace) and space.name == name and space.description
        assert load_space(name) == space
    paper = spaces["resnet50_imagenet"]
    assert paper.input_size == 224 and paper.backbones == ("resnet50",)
    stage = paper.stage_choices("resnet50")[0].choices
    assert stage.heads == [1, 2, 4, 8] and stage.alpha == [0.5, 1, 2]
    assert stage.channel_attn == ["none", "se", "eca", "fca"]
    assert spaces["quick"].stem == "cifar" and spaces["quick"].input_size <= 24


def test_unknown_name_and_missing_file() -> None:
    with pytest.raises(SpaceError, match=r"not a built-in .*quick"):
        load_space("no_such_space")
    with pytest.raises(SpaceError, match="no such search-space file"):
        load_space("missing/space.yaml")


def test_inline_dict_errors_name_the_field() -> None:
    with pytest.raises(SpaceError) as info:
        load_space({"name": "x", "backbone": "resnet18", "input_size": 32,
                    "all_stages": {"attn_order": ["sideways"]}})
    assert "<inline space>: all_stages.attn_order.0" in str(info.value)
    assert "channel_first, spsa_first" in str(info.value)


# -- spatial attention as a choice: SPSA, the non-local and GC blocks, SPSA's switches (issue 13) ---

SPATIAL = """\
name: spatial
backbone: resnet18
stem: cifar
input_size: 16
width: 0.25
strategies: [standalone]
all_stages:
  spatial: [none, spsa, nonlocal, gc]
  spsa_reverse: [true, false]
  spsa_similarity: [correlation, cosine]
  heads: [1, 2]
  channel_attn: [none, se]
"""


def test_builtin_spatial_ablation_space() -> None:
    space = load_space("spatial_ablation")
    assert space.backbones == ("resnet18",) and space.stem == "cifar" and space.input_size == 16
    assert space.widths == (0.25,)
    for stage in space.stage_choices("resnet18"):
        c = stage.choices
        assert c.spatial == ["none", "spsa", "nonlocal", "gc"] and c.spsa == [False, True]
        assert c.spsa_reverse == [True, False] and c.spsa_similarity == ["correlation", "cosine"]
        assert c.channel_attn == ["none"]
    # NL and GC have weights a supernet does not share: standalone only, and the space says why
    assert space.strategies == ["standalone"]
    assert any("searched standalone only" in note for note in space.notes)
    # per stage: none + SPSA (2 reverse x 2 similarities) + NL + GC = 7
    assert space.size() == 7**4


def test_spatial_space_counts_and_round_trips_as_stored(tmp_path: Path) -> None:
    space = load_space(_write(tmp_path, SPATIAL))
    # none: 2 channel attns; SPSA: 2 heads x 2 reverse x 2 similarities x (none + se x 1 order);
    # NL and GC: (none + se x 1 order) each
    assert space.size() == (2 + 2 * 2 * 2 * 2 + 2 + 2) ** 4
    stored = space.model_dump(mode="json", exclude_unset=True)  # what a study keeps
    assert "spsa" not in stored["all_stages"]  # derived from `spatial`, not stored
    again = load_space(stored)
    assert again == space and again.stage_choices("resnet18") == space.stage_choices("resnet18")


def test_spsa_and_spatial_together_are_refused_with_the_line(tmp_path: Path) -> None:
    message = _error(tmp_path, SPATIAL.replace("  spsa_reverse:", "  spsa: [false, true]\n  spsa_reverse:"))
    assert ":8: all_stages.spatial: give either `spsa`" in message and "not both" in message


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("[none, spsa, nonlocal, gc]", "[none, spsa, sa]",
         ":8: all_stages.spatial.2: unknown spatial attention 'sa'; valid: none, spsa, nonlocal, gc"),
        ("[none, spsa, nonlocal, gc]", "[none, gc, gc]", "all_stages.spatial: 'gc' is listed twice"),
        ("[correlation, cosine]", "[correlation, dot]",
         ":10: all_stages.spsa_similarity.1: unknown spsa_similarity 'dot'; valid: correlation, cosine"),
        ("[true, false]", "[true, maybe]", ":9: all_stages.spsa_reverse.1"),
        ("strategies: [standalone]", "strategies: [standalone, oneshot]",
         ":6: strategies: strategy oneshot does not support spatial attention 'nonlocal' (resnet18 stage 1)"),
    ],
)
def test_bad_spatial_choices_name_line_and_field(tmp_path: Path, old: str, new: str, needle: str) -> None:
    assert needle in _error(tmp_path, SPATIAL.replace(old, new))


def test_spsa_only_spatial_spaces_keep_oneshot() -> None:
    space = load_space({"name": "s", "backbone": "resnet18", "stem": "cifar", "input_size": 16,
                        "all_stages": {"spatial": ["none", "spsa"], "spsa_reverse": [True, False]}})
    assert space.strategies == ["standalone", "oneshot"] and space.notes == []


def test_spatial_and_spsa_overrides_replace_each_other() -> None:
    space = load_space({"name": "s", "backbone": "resnet18", "stem": "cifar", "input_size": 16,
                        "all_stages": {"spsa": [False, True]},
                        "stages": {2: {"spatial": ["gc", "none"]}}})
    stages = [s.choices for s in space.stage_choices("resnet18")]
    assert stages[0].spatial is None and stages[0].spatial_values() == ["none", "spsa"]
    assert stages[1].spatial == ["gc", "none"] and stages[1].spsa == [False]
    space = load_space({"name": "s", "backbone": "resnet18", "stem": "cifar", "input_size": 16,
                        "all_stages": {"spatial": ["nonlocal", "spsa"]}, "stages": {3: {"spsa": [True]}}})
    stages = [s.choices for s in space.stage_choices("resnet18")]
    assert stages[0].spsa == [False, True] and stages[0].spatial_values() == ["nonlocal", "spsa"]
    assert stages[2].spatial is None and stages[2].spatial_values() == ["spsa"]


def test_one_by_one_stage_drops_spsa_from_spatial_but_keeps_the_blocks() -> None:
    space = load_space({"name": "small", "backbone": "resnet18", "input_size": 32,
                        "all_stages": {"spatial": ["none", "spsa", "gc"]}})
    stages = [s.choices for s in space.stage_choices("resnet18")]
    assert stages[3].spatial == ["none", "gc"] and stages[3].spsa == [False]
    assert stages[2].spatial == ["none", "spsa", "gc"]
    assert any("stage 4 (layer4) is 1x1" in note for note in space.notes)


@pytest.mark.slow
def test_a_search_on_spatial_ablation_runs_through_the_local_runner(tmp_path: Path) -> None:
    """Two real trials (digits, 1 epoch) of the built-in space, enqueued so that NL, GC and SPSA
    with each switch flipped are sure to be trained, measured and stored (minutes on 2 cores)."""
    import optuna
    from optuna.trial import TrialState

    from search_spaces.config import SearchConfig
    from search_spaces.study import create_study
    from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig
    from spsa_nas.spec import ArchSpec
    from workers.local import run_local

    url = f"sqlite:///{tmp_path}/study.db"
    cfg = SearchConfig(study_name="ablation", space="spatial_ablation",
                       dataset=DataConfig(name="digits", train_subset=160), trials=2,
                       train=TrainConfig(epochs=1, batch_size=16), latency=LatencyConfig(repeats=3, warmup=1),
                       device="cpu")
    study = create_study(cfg, url)
    study.enqueue_trial({"s1.spatial": "nonlocal", "s2.spatial": "gc", "s3.spatial": "spsa",
                         "s3.reverse": False, "s3.similarity": "cosine", "s4.spatial": "none"})
    study.enqueue_trial({"s1.spatial": "spsa", "s1.reverse": True, "s1.similarity": "correlation",
                         "s2.spatial": "nonlocal", "s3.spatial": "gc", "s4.spatial": "spsa",
                         "s4.reverse": False, "s4.similarity": "correlation"})
    report = run_local("ablation", url, artifact_dir=tmp_path / "artifacts")
    assert report.outcome == "done" and report.finished == 2, report.last_error
    trials = optuna.load_study(study_name="ablation", storage=url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, [t.user_attrs.get("error") for t in trials]
    first = ArchSpec.model_validate(trials[0].user_attrs["spec"])
    assert [s.spatial for s in first.stages] == ["nonlocal", "gc", "spsa", "none"]
    assert not first.stages[2].spsa_reverse and first.stages[2].spsa_similarity == "cosine"
    assert trials[0].user_attrs["spec"]["stages"][2]["spsa_reverse"] is False  # stored as chosen
    plain = ArchSpec.plain("resnet18", num_classes=10, in_channels=1, stem="cifar", input_size=16, width=0.25)
    from spsa_nas import build_model
    from spsa_nas.counting import count_params

    assert trials[0].user_attrs["params"] > count_params(build_model(plain))  # NL and GC weigh
    for t in trials:
        assert 0.0 <= t.user_attrs["val_acc"] <= 1.0 and t.user_attrs["latency_ms"] > 0
        names = {f"s{n}.{p}" for n in range(1, 5) for p in ("spatial", "reverse", "similarity")}
        assert set(t.params) <= names
