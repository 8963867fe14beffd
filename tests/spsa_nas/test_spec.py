"""Tests of the architecture spec: validation with field paths, JSON round-trip, the stage table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from spsa_nas.spec import (
    BACKBONES,
    CHANNEL_ATTENTIONS,
    ArchSpec,
    StageSpec,
    feature_sizes,
    make_divisible,
    stage_table,
)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_json_round_trip_every_backbone(backbone: str) -> None:
    spec = ArchSpec.uniform(
        backbone,
        StageSpec(spsa=True, spsa_heads=2, spsa_alpha=0.5, channel_attn="eca",
                  attn_order="spsa_first"),
        num_classes=10, stem="cifar", input_size=32,
    )
    text = spec.model_dump_json()
    again = ArchSpec.model_validate_json(text)
    assert again == spec
    assert json.loads(text)["schema_version"] == 1


def test_spec_is_frozen_and_forbids_extra_fields() -> None:
    spec = ArchSpec.plain("resnet18")
    with pytest.raises(ValidationError):
        spec.backbone = "resnet34"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        ArchSpec.model_validate({**spec.model_dump(), "depth": 3})
    with pytest.raises(ValidationError, match=r"stages\.0\.spsa_head"):
        ArchSpec.model_validate({**spec.model_dump(), "stages": [{"spsa_head": 2}] * 4})


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"stages": [{"spsa": True, "spsa_heads": 3}] * 4}, "stages.0.spsa_heads: 3 does not divide"),
        ({"stages": [{}, {}, {"channel_attn": "gsop"}, {}]}, "unknown channel attention 'gsop'"),
        ({"stages": [{}] * 3}, "resnet18 has 4 stages"),
        ({"stages": [{}, {"spsa_alpha": 0}, {}, {}]}, "stages.1.spsa_alpha"),
        ({"stages": [{}, {"spsa_alpha": 1e6}, {}, {}]}, "stages.1.spsa_alpha"),
        ({"stages": [{}, {"spsa_alpha": float("nan")}, {}, {}]}, "stages.1.spsa_alpha"),
        ({"backbone": "vgg16"}, "backbone"),
        ({"num_classes": 1}, "num_classes"),
        ({"schema_version": 2}, "schema_version"),
    ],
)
def test_bad_specs_name_the_field(change: dict, needle: str) -> None:
    body = {"backbone": "resnet18", "stages": [{}] * 4, **change}
    with pytest.raises(ValidationError) as info:
        ArchSpec.model_validate(body)
    assert needle in str(info.value)


def test_heads_checked_only_where_spsa_is_on_and_at_the_specs_width() -> None:
    # 3 heads do not divide 64 channels, but SPSA is off there: nothing to check.
    ArchSpec.model_validate({"backbone": "resnet18",
                             "stages": [{"spsa": False, "spsa_heads": 3}] + [{}] * 3})
    # width 0.25: layer1 has 16 channels, so 32 heads leave no channel pairs
    with pytest.raises(ValidationError, match=r"stages\.0\.spsa_heads"):
        ArchSpec.model_validate({"backbone": "resnet18", "width": 0.25,
                                 "stages": [{"spsa": True, "spsa_heads": 32}] + [{}] * 3})


def test_stage_table_channels() -> None:
    assert [s.channels for s in stage_table("resnet50")] == [256, 512, 1024, 2048]
    assert [s.channels for s in stage_table("resnet18", 0.25)] == [16, 32, 64, 128]
    assert [s.channels for s in stage_table("mobilenet_v2")] == [16, 24, 32, 64, 96, 160, 320]
    assert [s.channels for s in stage_table("shufflenet_v2_x1_0")] == [58, 116, 232]
    assert sum(s.blocks for s in stage_table("resnet152")) == 50
    assert sum(s.blocks for s in stage_table("mobilenet_v2")) == 17
    assert make_divisible(24 * 0.5, 8) == 16  # never more than 10 % below the request


def test_feature_sizes() -> None:
    assert feature_sizes("resnet50", "imagenet", 224) == (56, 28, 14, 7)
    assert feature_sizes("resnet18", "imagenet", 32) == (8, 4, 2, 1)  # layer4 is 1x1
    assert feature_sizes("resnet18", "cifar", 32) == (32, 16, 8, 4)
    assert feature_sizes("mobilenet_v2", "imagenet", 224) == (112, 56, 28, 14, 14, 7, 7)
    assert feature_sizes("shufflenet_v2_x1_0", "imagenet", 224) == (28, 14, 7)


def test_channel_attention_names_are_the_registry() -> None:
    from spsa_nas.attention import ATTENTIONS

    assert tuple(ATTENTIONS) == CHANNEL_ATTENTIONS


def test_spec_and_config_import_no_torch() -> None:
    code = ("import sys, spsa_nas.spec, spsa_nas.config, search_spaces.config;"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- SPSA's ablation switches and the spatial baselines (issue 13) ----------------------------------

#: A spec JSON exactly as stored before the three later stage fields existed (a cache key).
OLD_SPEC_JSON = (
    '{"schema_version":1,"backbone":"resnet18","num_classes":10,"in_channels":3,"stem":"cifar",'
    '"input_size":16,"width":0.25,"stages":[{"spsa":true,"spsa_heads":2,"spsa_alpha":1.5,'
    '"channel_attn":"se","attn_order":"spsa_first"},{"spsa":false,"spsa_heads":1,"spsa_alpha":1.0,'
    '"channel_attn":"none","attn_order":"channel_first"},{"spsa":true,"spsa_heads":1,'
    '"spsa_alpha":1.0,"channel_attn":"none","attn_order":"channel_first"},{"spsa":false,'
    '"spsa_heads":1,"spsa_alpha":1.0,"channel_attn":"eca","attn_order":"channel_first"}]}'
)


def test_an_old_spec_round_trips_byte_identical() -> None:
    spec = ArchSpec.model_validate_json(OLD_SPEC_JSON)
    assert spec.model_dump_json() == OLD_SPEC_JSON
    assert json.dumps(spec.model_dump(mode="json"), separators=(",", ":")) == OLD_SPEC_JSON
    stage = spec.stages[0]
    assert (stage.spsa_reverse, stage.spsa_similarity, stage.spatial_attn) == (True, "correlation", "none")
    # defaults given explicitly serialise as if left out: the same spec, the same key
    explicit = StageSpec(spsa=True, spsa_heads=2, spsa_alpha=1.5, channel_attn="se",
                         attn_order="spsa_first", spsa_reverse=True, spsa_similarity="correlation",
                         spatial_attn="none")
    assert explicit == stage and explicit.model_dump_json() == stage.model_dump_json()


def test_the_new_stage_fields_round_trip_where_set() -> None:
    stages = [StageSpec(spsa=True, spsa_reverse=False), StageSpec(spsa=True, spsa_similarity="cosine"),
              StageSpec(spatial_attn="nonlocal", channel_attn="se", attn_order="spsa_first"),
              StageSpec(spatial_attn="gc")]
    spec = ArchSpec(backbone="resnet18", stages=stages, stem="cifar", input_size=16, width=0.25)
    text = spec.model_dump_json()
    data = json.loads(text)["stages"]
    assert data[0]["spsa_reverse"] is False and "spsa_similarity" not in data[0]
    assert data[1]["spsa_similarity"] == "cosine" and "spsa_reverse" not in data[1]
    assert data[2]["spatial_attn"] == "nonlocal" and data[3]["spatial_attn"] == "gc"
    assert all("spatial_attn" not in d for d in data[:2])
    again = ArchSpec.model_validate_json(text)
    assert again == spec and again.model_dump_json() == text
    assert [s.spatial for s in again.stages] == ["spsa", "spsa", "nonlocal", "gc"]
    assert json.loads(text)["schema_version"] == 1


@pytest.mark.parametrize(
    ("stage", "needle"),
    [
        ({"spsa": True, "spatial_attn": "nonlocal"},
         "stages.2.spatial_attn: 'nonlocal' is an alternative to SPSA, which is on in this stage"),
        ({"spsa": True, "spatial_attn": "gc"}, "stages.2.spatial_attn: 'gc'"),
        ({"spsa_reverse": False}, "stages.2.spsa_reverse: False is a switch of SPSA, which is off"),
        ({"spatial_attn": "gc", "spsa_similarity": "cosine"},
         "stages.2.spsa_similarity: 'cosine' is a switch of SPSA, which is off"),
        ({"spatial_attn": "sa"}, "stages.2.spatial_attn"),
        ({"spsa": True, "spsa_similarity": "dot"}, "stages.2.spsa_similarity"),
        ({"spsa": True, "spsa_reverse": "sometimes"}, "stages.2.spsa_reverse"),
    ],
)
def test_bad_switches_and_spatial_attentions_name_the_field(stage: dict, needle: str) -> None:
    body = {"backbone": "resnet18", "stages": [{}, {}, stage, {}]}
    with pytest.raises(ValidationError) as info:
        ArchSpec.model_validate(body)
    assert needle in str(info.value)


def test_spatial_and_similarity_names_match_the_modules() -> None:
    from spsa_nas.spec import SIMILARITIES, SPATIAL_ATTENTIONS

    assert SPATIAL_ATTENTIONS == ("none", "nonlocal", "gc")
    assert SIMILARITIES == ("correlation", "cosine")
    from spsa_nas.attention.gc import GCBlock
    from spsa_nas.attention.nonlocal_block import NonLocalBlock
    from spsa_nas.attention.spsa import SIMILARITIES as SPSA_SIMILARITIES
    from spsa_nas.models._attn import make_spatial

    assert tuple(SPSA_SIMILARITIES) == SIMILARITIES  # the spec's (no torch) and the module's agree
    assert make_spatial(16, StageSpec()) is None
    assert isinstance(make_spatial(16, StageSpec(spatial_attn="nonlocal")), NonLocalBlock)
    assert isinstance(make_spatial(16, StageSpec(spatial_attn="gc")), GCBlock)
