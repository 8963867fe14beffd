"""Attention maps (the SPSA paper's Fig. 3): what SPSA weights on a constructed input, the weights read
back from real models against the formula, the PNG figure, bad images, and `spsa-nas attention-map`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from service.testing import cli
from spsa_nas import build_model
from spsa_nas.attention import SPSA
from spsa_nas.attention_maps import ImageError, attention_map_png, capture_spsa_maps, load_image
from spsa_nas.spec import ArchSpec

SPEC = {
    "backbone": "resnet18", "num_classes": 10, "in_channels": 1, "stem": "cifar", "input_size": 16,
    "width": 0.25,
    "stages": [{"spsa": True, "spsa_heads": 2, "channel_attn": "se"}, {"spsa": True, "spsa_alpha": 2.0},
               {}, {}],
}


def bright_square(channels: int = 8, size: int = 12) -> tuple[torch.Tensor, np.ndarray]:
    """Features of a bright square on a dark background, as a layer might see them.

    Every background pixel carries the same channel pattern p (plus a little noise), so the key —
    the average over all pixels, most of them background — points along p. Square pixels carry
    5 × (−p): bright, and of the opposite pattern. Their Pearson correlation with the key is
    therefore close to −1 and the background's close to +1, so the paper's reversed weight
    A = 1 − σ(r) is high on the square (≈ 0.73) and low on the background (≈ 0.27); without the
    reverse, σ(r) = 1 − A would be the other way round (the paper's Fig. 3 with and without it).
    """
    generator = torch.Generator().manual_seed(0)
    pattern = torch.tensor([1.0, -1.0] * (channels // 2))
    x = pattern[:, None, None].expand(channels, size, size).clone()
    square = np.zeros((size, size), dtype=bool)
    square[4:8, 4:8] = True
    x[:, torch.from_numpy(square)] = -5.0 * pattern[:, None]
    x += 0.05 * torch.randn(x.shape, generator=generator)
    return x[None], square


def test_spsa_weights_the_bright_square_over_the_background() -> None:
    x, square = bright_square()
    module = torch.nn.Sequential()
    module.add_module("spsa", SPSA(8))
    (entry,) = capture_spsa_maps(module, x)
    assert entry.weight.shape == square.shape
    assert entry.weight[square].min() > 0.7 and entry.weight[~square].max() < 0.3
    reverse_off = 1.0 - entry.weight  # σ(r), for alpha = 1
    assert reverse_off[~square].min() > 0.7 and reverse_off[square].max() < 0.3
    torch.testing.assert_close(torch.from_numpy(entry.input_mean), x[0].mean(0))


def profiled_square(channels: int = 8, size: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    """A bright square whose channel profile differs from the background's (the paper's Fig. 3 setting).

    Background pixels all carry the profile q = 0.2 + 0.1·(1, −1, 1, −1, …); the 4×4 square (16 of
    256 pixels) carries p = 1 + 0.5·(1, 1, −1, −1, …): five times brighter and with another pattern
    (orthogonal to q's once both are centred). The key, the mean over all pixels, is
    0.94·q + 0.06·p: dominated by the background. So background pixels resemble the key (Pearson
    r ≈ 0.95, cosine ≈ 0.99) and the square's much less (r ≈ 0.32, cosine ≈ 0.88). The paper's
    reversed gate A = 1 − σ(r) therefore gives the background a LOW weight and the square a higher
    one — SPSA suppresses what looks like the global context and lifts what stands out — while the
    plain gate A = σ(r) does the opposite.
    """
    generator = torch.Generator().manual_seed(3)
    alternate = torch.tensor([1.0, -1.0] * (channels // 2))
    pairs = torch.tensor([1.0, 1.0, -1.0, -1.0] * (channels // 4))
    q, p = 0.2 + 0.1 * alternate, 1.0 + 0.5 * pairs
    x = q[:, None, None].expand(channels, size, size).clone()
    square = np.zeros((size, size), dtype=bool)
    square[6:10, 6:10] = True
    x[:, torch.from_numpy(square)] = p[:, None]
    x += 0.01 * torch.randn(x.shape, generator=generator)
    return x[None], square


@pytest.mark.parametrize("similarity", ["correlation", "cosine"])
def test_fig3_reverse_weights_the_square_and_no_reverse_the_background(similarity: str) -> None:
    """The paper's Fig. 3 claim on `profiled_square`: with the reverse, A is higher on the square
    than anywhere on the background; without it, lower. The maps come from the modules' own
    switches (capture_spsa_maps reads A back from each module's output)."""
    x, square = profiled_square()
    maps = {}
    for reverse in (True, False):
        model = torch.nn.Sequential()
        model.add_module("spsa", SPSA(8, reverse=reverse, similarity=similarity))  # type: ignore[arg-type]
        (entry,) = capture_spsa_maps(model, x)
        assert (entry.reverse, entry.similarity) == (reverse, similarity)
        maps[reverse] = entry.weight
    assert maps[True][square].min() > maps[True][~square].max() + 0.01
    assert maps[False][square].max() < maps[False][~square].min() - 0.01
    # for alpha = 1 the two gates are complements: σ(r) = 1 − (1 − σ(r))
    np.testing.assert_allclose(maps[False], 1.0 - maps[True], atol=1e-5)
    # and A is the switched formula itself, written out here in float64
    xs = x[0].double()
    key = xs.mean((1, 2))
    if similarity == "correlation":
        xs, key = xs - xs.mean(0), key - key.mean()
    r = (xs * key[:, None, None]).sum(0) / (xs.norm(dim=0) * key.norm())
    np.testing.assert_allclose(maps[False], torch.sigmoid(r).numpy(), atol=1e-5)


def test_the_figure_names_non_default_switches() -> None:
    x, _ = profiled_square()
    model = torch.nn.Sequential()
    model.add_module("spsa", SPSA(8, reverse=False, similarity="cosine"))
    (entry,) = capture_spsa_maps(model, x)
    assert entry.switches() == "reverse off, cosine"
    default = torch.nn.Sequential()
    default.add_module("spsa", SPSA(8))
    assert capture_spsa_maps(default, x)[0].switches() == ""
    assert Image.open(io.BytesIO(attention_map_png(model, x))).format == "PNG"


def _formula(x: torch.Tensor, heads: int, alpha: float) -> torch.Tensor:
    """A per head, written out from the paper's definition (no eps needed on these inputs)."""
    n, c, h, w = x.shape
    xs = x.double().reshape(n, heads, c // heads, h, w)
    key = xs.mean((3, 4), keepdim=True)
    xc, kc = xs - xs.mean(2, keepdim=True), key - key.mean(2, keepdim=True)
    r = (xc * kc).sum(2) / (xc.norm(dim=2) * kc.norm(dim=2))
    return (1 - torch.sigmoid(r)) ** alpha


def test_weights_read_back_from_a_model_equal_the_formula_on_the_modules_input() -> None:
    model = build_model(ArchSpec.model_validate(SPEC))
    captured: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, SPSA):
            module.register_forward_pre_hook(
                lambda m, args, name=name: captured.__setitem__(name, args[0].detach().clone()))
    image = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    maps = capture_spsa_maps(model, image)
    assert [m.block for m in maps] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    for entry in maps:
        expected = _formula(captured[entry.name], entry.heads, entry.alpha)[0].mean(0)
        np.testing.assert_allclose(entry.weight, expected.numpy(), rtol=1e-3, atol=1e-4)
    assert {m.heads for m in maps[:2]} == {2} and {m.alpha for m in maps[2:]} == {2.0}


def test_modules_are_chosen_by_block_and_a_wrong_name_lists_the_valid_ones() -> None:
    model = build_model(ArchSpec.model_validate(SPEC))
    image = torch.rand(1, 1, 16, 16)
    assert [m.block for m in capture_spsa_maps(model, image, ["layer2.1", "layer1"])] == [
        "layer2.1", "layer1.0", "layer1.1"]
    with pytest.raises(ValueError, match=r"no SPSA module in 'layer3.0'; .*layer1\.0, layer1\.1, layer2\.0"):
        capture_spsa_maps(model, image, ["layer3.0"])
    plain = build_model(ArchSpec.model_validate({**SPEC, "stages": [{}] * 4}))
    with pytest.raises(ValueError, match="no SPSA module"):
        capture_spsa_maps(plain, image)


def test_the_figure_is_a_png_with_a_row_per_module_and_the_model_is_unchanged() -> None:
    model = build_model(ArchSpec.model_validate(SPEC)).train()
    image = torch.rand(1, 1, 16, 16)
    png_one = attention_map_png(model, image, ["layer2.0"], title="one")
    png_all = attention_map_png(model, image, title="all")
    assert model.training  # restored
    one, every = Image.open(io.BytesIO(png_one)), Image.open(io.BytesIO(png_all))
    assert one.format == every.format == "PNG"
    assert every.height > 3 * one.height  # four rows against one


def _png(size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, "white").save(out, format=fmt)
    return out.getvalue()


def test_images_are_loaded_as_the_model_is_fed_and_bad_ones_are_refused() -> None:
    tensor = load_image(_png((40, 30)), in_channels=1, size=16)
    assert tensor.shape == (1, 1, 16, 16) and torch.allclose(tensor, torch.ones_like(tensor))
    assert load_image(_png((8, 8), "L", "JPEG"), in_channels=3, size=16).shape == (1, 3, 16, 16)
    with pytest.raises(ImageError, match="cannot be read as PNG or JPEG"):
        load_image(b"not an image", in_channels=1, size=16)
    with pytest.raises(ImageError, match="is GIF; send a PNG or JPEG"):
        load_image(_png((8, 8), "P", "GIF"), in_channels=1, size=16)
    with pytest.raises(ImageError, match="at most 25,000,000 are accepted"):
        load_image(_png((6000, 5000), "1"), in_channels=1, size=16)  # tiny file, huge decoded size
    with pytest.raises(ImageError, match="cannot be read"):
        load_image(_png((64, 64))[:60], in_channels=1, size=16)  # truncated


def test_the_cli_draws_the_maps_of_a_spec_and_its_weights(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(SPEC))
    model = build_model(ArchSpec.model_validate(SPEC))
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    image = tmp_path / "digit.png"
    image.write_bytes(_png((28, 28), "L"))
    out = tmp_path / "maps.png"
    done = cli("attention-map", "--spec", str(spec_path), "--weights", str(weights), "--image", str(image),
               "--modules", "layer2.1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert Image.open(out).format == "PNG"

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a not really")
    refused = cli("attention-map", "--spec", str(spec_path), "--image", str(bad), "--out", str(out))
    assert refused.returncode == 2
    assert f"--image {bad}: the image cannot be read as PNG or JPEG" in refused.stderr
    assert "Traceback" not in refused.stderr
    wrong = cli("attention-map", "--spec", str(spec_path), "--image", str(image), "--modules", "layer4.0",
                "--out", str(out))
    assert wrong.returncode == 2 and "the model has SPSA in: layer1.0" in wrong.stderr
    neither = cli("attention-map", "--image", str(image), "--out", str(out))
    assert neither.returncode == 2 and "give --spec FILE" in neither.stderr


def test_the_cli_draws_a_search_trials_maps_on_a_sample_of_its_dataset(tmp_path: Path) -> None:
    import optuna

    from search_spaces.config import SearchConfig
    from search_spaces.study import create_study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    cfg = SearchConfig.model_validate({"space": "quick", "study_name": "maps", "dataset": {"name": "digits"}})
    study = create_study(cfg, url)
    trial = study.ask()
    weights = tmp_path / "w.safetensors"
    model = build_model(ArchSpec.model_validate(SPEC))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    artifact = optuna.artifacts.upload_artifact(
        artifact_store=optuna.artifacts.FileSystemArtifactStore(str(artifacts)), file_path=str(weights),
        study_or_trial=trial)
    for key, value in {"spec": SPEC, "weights_artifact": artifact, "val_acc": 0.5, "latency_ms": 1.0,
                       "feasible": True}.items():
        trial.set_user_attr(key, value)
    study.tell(trial, [0.5, 1.0])
    out = tmp_path / "maps.png"
    done = cli("attention-map", "--storage", url, "--artifacts", str(artifacts), "--sample", "3",
               "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert Image.open(out).format == "PNG"
    outside = cli("attention-map", "--storage", url, "--artifacts", str(artifacts), "--sample", "100000",
                  "--out", str(out))
    assert outside.returncode == 2 and "--sample 100000: the validation split of digits has" in outside.stderr
