"""Attention maps of a model's SPSA modules (the SPSA paper's Fig. 3): per module, the input (channel
mean), the attention weight A and the output, captured on one image and drawn as a PNG with Pillow."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from spsa_nas.attention import SPSA
from spsa_nas.config import DataConfig
from spsa_nas.data.images import adapt_channels, resize
from spsa_nas.data.registry import load_data
from spsa_nas.image_files import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, ImageError, open_image
from spsa_nas.spec import ArchSpec

CELL = 160  # pixels per panel side in the figure


@dataclass(frozen=True)
class SPSAMap:
    """What one SPSA module saw and did on one image (maps of its output resolution)."""

    name: str  # the module's name in the model, e.g. "layer2.3.spsa"
    block: str  # the block it belongs to, e.g. "layer2.3"
    alpha: float
    heads: int
    input_mean: np.ndarray  # (H, W): the input's mean over channels
    weight: np.ndarray  # (H, W): A, averaged over heads when there are several
    output_mean: np.ndarray  # (H, W): the output's mean over channels
    reverse: bool = True  # the module's gate: (1 - sigmoid(r))^alpha, else sigmoid(r)^alpha
    similarity: str = "correlation"  # the module's r: "correlation" or "cosine"

    def switches(self) -> str:
        """The module's non-default ablation switches, e.g. "reverse off, cosine" ("" for none)."""
        return ", ".join(([] if self.reverse else ["reverse off"])
                         + ([] if self.similarity == "correlation" else [self.similarity]))


def load_image(data: bytes | Path, *, in_channels: int, size: int) -> torch.Tensor:
    """A PNG or JPEG file (or its bytes) as the model's input: (1, in_channels, size, size) in
    [0, 1], as the training data is served. ImageError says what is wrong with a bad image."""
    raw = Path(data).read_bytes() if isinstance(data, Path) else data
    with open_image(raw) as image:
        converted = image.convert("L" if in_channels == 1 else "RGB")
    array = np.asarray(converted, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.copy())
    tensor = tensor[None, None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)[None]
    return adapt_channels(resize(tensor, size), in_channels, "image")


def validation_image(data: DataConfig, spec: ArchSpec, index: int) -> torch.Tensor:
    """Image `index` of the validation split of `data`, as `spec`'s model is fed (1, C, H, W);
    IndexError saying how many there are when it is out of range."""
    splits = load_data(data, spec.input_size, spec.in_channels)
    count = len(splits.val)
    if not 0 <= index < count:
        raise IndexError(f"sample {index}: the validation split of {data.name} has {count} images "
                         f"(0..{count - 1})")
    return splits.val[index][0][None]


def spsa_modules(model: nn.Module) -> dict[str, SPSA]:
    """The model's SPSA modules by name, in forward order of definition."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SPSA)}


def _block_of(name: str) -> str:
    """The block a module sits in: its name up to the last numeric part ("layer2.1.attn.spsa" →
    "layer2.1"), or its parent's name."""
    parts = name.split(".")
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    if numeric:
        return ".".join(parts[: numeric[-1] + 1])
    return ".".join(parts[:-1]) or name


def _select(found: dict[str, SPSA], modules: Sequence[str] | None) -> list[str]:
    if not found:
        raise ValueError("the model has no SPSA module: there is no attention map to draw")
    if not modules:
        return list(found)
    chosen = []
    for wanted in modules:
        matches = [name for name in found if name == wanted or name.startswith(f"{wanted}.")]
        if not matches:
            valid = ", ".join(dict.fromkeys(_block_of(n) for n in found))
            raise ValueError(f"no SPSA module in {wanted!r}; the model has SPSA in: {valid}")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def _weight(x: torch.Tensor, out: torch.Tensor, heads: int, alpha: float) -> torch.Tensor:
    """A of each pixel and head, read back from SPSA's own input and output (out = x · A): per head,
    at the channel where |x| is largest; a pixel vector that is zero everywhere has A = 0.5 ** alpha
    by SPSA's definition (r = 0, whatever the gate and similarity). Works for every implementation of
    the operator, fused ones included, and so for the module's own `reverse` and `similarity`."""
    n, c, h, w = x.shape
    xs = x.reshape(n, heads, c // heads, h, w)
    outs = out.reshape(n, heads, c // heads, h, w)
    index = xs.abs().argmax(dim=2, keepdim=True)
    x_max = xs.gather(2, index).squeeze(2)
    out_max = outs.gather(2, index).squeeze(2)
    zero = x_max == 0
    ratio = out_max / torch.where(zero, torch.ones_like(x_max), x_max)
    return torch.where(zero, torch.full_like(ratio, 0.5**alpha), ratio)  # (N, heads, H, W)


@torch.no_grad()
def capture_spsa_maps(
    model: nn.Module, image: torch.Tensor, modules: Sequence[str] | None = None
) -> list[SPSAMap]:
    """Run `model` (eval mode, restored afterwards) on `image` (1, C, H, W) and return the maps of
    its SPSA modules, or of those named in `modules` (a module's or its block's name, such as
    "layer2.3"). ValueError names the valid blocks when a name matches none."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, C, H, W), got {tuple(image.shape)}")
    found = spsa_modules(model)
    chosen = _select(found, modules)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    inputs: dict[str, torch.Tensor] = {}

    def before(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            inputs[name] = args[0].detach().clone()  # the blocks run SPSA in place: copy first
        return hook

    def after(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen[name] = (inputs.pop(name), output.detach().clone())
        return hook

    handles = []
    for name in chosen:
        handles.append(found[name].register_forward_pre_hook(before(name)))
        handles.append(found[name].register_forward_hook(after(name)))
    was_training = model.training
    try:
        model.eval()
        model(image)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    maps = []
    for name in chosen:
        x, out = (t.float() for t in seen[name])
        module = found[name]
        weight = _weight(x, out, module.heads, module.alpha)
        maps.append(SPSAMap(
            name=name, block=_block_of(name), alpha=module.alpha, heads=module.heads,
            input_mean=x[0].mean(0).cpu().numpy(), weight=weight[0].mean(0).cpu().numpy(),
            output_mean=out[0].mean(0).cpu().numpy(), reverse=module.reverse, similarity=module.similarity,
        ))
    return maps


# A perceptual ramp (dark violet → orange → light yellow, like "inferno"), interpolated linearly.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def _colour(values: np.ndarray, low: float, high: float) -> np.ndarray:
    span = high - low if high > low else 1.0
    t = np.clip((values - low) / span, 0.0, 1.0) * (len(_RAMP) - 1)
    lower = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
    frac = (t - lower)[..., None]
    return (_RAMP[lower] * (1 - frac) + _RAMP[lower + 1] * frac).astype(np.uint8)


def _panel(values: np.ndarray, low: float, high: float, background: Image.Image) -> Image.Image:
    heat = Image.fromarray(_colour(values, low, high), "RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
    return Image.blend(background, heat, 0.65)  # overlaid on the image


def render_maps(image: torch.Tensor, maps: Sequence[SPSAMap], title: str = "") -> bytes:
    """A PNG: one row per SPSA module — the image, then its input (channel mean), A and its output,
    each overlaid on the image and scaled to its own range (printed under the panel)."""
    picture = image[0].clamp(0, 1)
    picture = picture.expand(3, -1, -1) if picture.shape[0] == 1 else picture[:3]
    base = Image.fromarray((picture.permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8), "RGB")
    base = base.resize((CELL, CELL), Image.Resampling.BILINEAR)
    grey = base.convert("L").convert("RGB")
    font = ImageFont.load_default()
    header, label = 22 if title else 0, 30
    columns = ("image", "input (channel mean)", "weight A", "output (channel mean)")
    width = 4 * CELL + 5 * 6
    height = header + len(maps) * (CELL + label + 18) + 6
    figure = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(figure)
    if title:
        draw.text((6, 4), title, fill="black", font=font)
    y = header
    for entry in maps:
        switches = f"{entry.switches()}, " if entry.switches() else ""
        draw.text((6, y + 2), f"{entry.block}  (alpha={entry.alpha:g}, heads={entry.heads}, {switches}"
                  f"{entry.weight.shape[0]}x{entry.weight.shape[1]})", fill="black", font=font)
        y += 18
        panels = [
            (base, columns[0], ""),
            (_panel(entry.input_mean, float(entry.input_mean.min()), float(entry.input_mean.max()), grey),
             columns[1], f"{entry.input_mean.min():.3g} .. {entry.input_mean.max():.3g}"),
            (_panel(entry.weight, float(entry.weight.min()), float(entry.weight.max()), grey), columns[2],
             f"{entry.weight.min():.3f} .. {entry.weight.max():.3f}"),
            (_panel(entry.output_mean, float(entry.output_mean.min()), float(entry.output_mean.max()), grey),
             columns[3], f"{entry.output_mean.min():.3g} .. {entry.output_mean.max():.3g}"),
        ]
        for i, (panel, name, scale) in enumerate(panels):
            x = 6 + i * (CELL + 6)
            figure.paste(panel, (x, y))
            draw.text((x, y + CELL + 2), name, fill="black", font=font)
            if scale:
                draw.text((x, y + CELL + 14), scale, fill="dimgray", font=font)
        y += CELL + label
    out = io.BytesIO()
    figure.save(out, format="PNG")
    return out.getvalue()


def attention_map_png(model: nn.Module, image: torch.Tensor, modules: Sequence[str] | None = None,
                      title: str = "") -> bytes:
    """capture_spsa_maps then render_maps: the figure of `model`'s SPSA modules on `image`."""
    return render_maps(image, capture_spsa_maps(model, image, modules), title)


__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "ImageError",
    "SPSAMap",
    "attention_map_png",
    "capture_spsa_maps",
    "load_image",
    "render_maps",
    "spsa_modules",
    "validation_image",
]
