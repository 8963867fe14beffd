"""The attention a block carries: a stage's channel attention and/or SPSA, chained in the spec's order."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial

from torch import Tensor, nn

from spsa_nas.attention import SPSA, create_attention
from spsa_nas.spec import ArchSpec, StageSpec

#: ECA's 1-D kernel per ResNet stage, as in the released ECA-ResNet-50 checkpoint (k = 3, 5, 5, 7).
#: With these, ECA in every block adds 80 / 165 / 250 parameters to ResNet-50/101/152.
RESNET_ECA_KERNELS: tuple[int, ...] = (3, 5, 5, 7)

#: A factory that builds one block's attention for the block's `channels`.
AttnFactory = Callable[[int], nn.Module]


def eca_adaptive_kernel(channels: int, gamma: int = 2, beta: int = 1) -> int:
    """ECA's adaptive rule: k = |log2(C)/gamma + beta/gamma| rounded down, made odd (upwards)."""
    t = int(abs((math.log2(channels) + beta) / gamma))
    return t if t % 2 else t + 1


class BlockAttention(nn.Module):
    """Channel attention and/or SPSA on one block's output, in the stage's `attn_order`.

    Submodule names (they show up in the state_dict): `channel` for the channel attention
    (e.g. `layer1.0.attn.channel.fc1.weight`) and `spsa` for SPSA (no parameters). A block with
    no attention has `attn = nn.Identity()`, so that its state_dict keys are torchvision's.
    """

    def __init__(self, channel: nn.Module | None, spsa: nn.Module | None, order: str) -> None:
        super().__init__()
        if channel is None and spsa is None:
            raise ValueError("BlockAttention needs a channel attention, SPSA, or both")
        self.order = order
        self.channel = channel
        self.spsa = spsa

    def forward(self, x: Tensor) -> Tensor:
        if self.order == "channel_first":
            if self.channel is not None:
                x = self.channel(x)
            if self.spsa is not None:
                x = self.spsa(x)
        else:
            if self.spsa is not None:
                x = self.spsa(x)
            if self.channel is not None:
                x = self.channel(x)
        return x

    def extra_repr(self) -> str:
        return f"order={self.order}"


def _make_block_attention(channels: int, *, stage: StageSpec, options: dict[str, int]) -> nn.Module:
    channel = None
    if stage.channel_attn != "none":
        channel = create_attention(stage.channel_attn, channels, **options)
    spsa = SPSA(channels, alpha=stage.spsa_alpha, heads=stage.spsa_heads) if stage.spsa else None
    if channel is None and spsa is None:
        return nn.Identity()
    return BlockAttention(channel, spsa, stage.attn_order)


def _no_attention(channels: int) -> nn.Module:
    del channels
    return nn.Identity()


def stage_attention(spec: ArchSpec, index: int) -> AttnFactory:
    """The attention factory for stage `index` of `spec` (called once per block with its channels).

    Options: ECA's kernel is 3, 5, 5, 7 for the four ResNet/ResNeXt stages and ECA's adaptive rule
    (`eca_adaptive_kernel`) for MobileNetV2 and ShuffleNetV2; FCA's DCT size is
    max(7, the stage's feature size at `spec.input_size`); SE and CBAM keep their default ratio.
    """
    stage = spec.stages[index]
    if not stage.spsa and stage.channel_attn == "none":
        return _no_attention
    options: dict[str, int] = {}
    if stage.channel_attn == "eca":
        if spec.backbone.startswith(("resnet", "resnext")):
            options["kernel_size"] = RESNET_ECA_KERNELS[index]
        else:
            options["kernel_size"] = eca_adaptive_kernel(spec.stage_info()[index].channels)
    elif stage.channel_attn == "fca":
        options["dct_size"] = max(7, spec.feature_sizes()[index])
    return partial(_make_block_attention, stage=stage, options=options)


def backbone_modules(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule of `module` that is not part of an attention (for the backbone's own init)."""
    yield module
    for child in module.children():
        if isinstance(child, BlockAttention):
            continue
        yield from backbone_modules(child)
