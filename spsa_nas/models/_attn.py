"""The attention a block carries: a stage's channel attention and/or a spatial attention (SPSA, or the
non-local or global-context block in its place), chained in the spec's order."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from spsa_nas.attention import SPSA, create_attention
from spsa_nas.attention.gc import GCBlock
from spsa_nas.attention.nonlocal_block import NonLocalBlock
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
    """Channel attention and/or a spatial attention on one block's output, in the stage's `attn_order`.

    Submodule names (they show up in the state_dict): `channel` for the channel attention
    (e.g. `layer1.0.attn.channel.fc1.weight`), `spsa` for SPSA (no parameters) and `spatial` for
    the non-local or GC block a stage may carry instead of SPSA (e.g.
    `layer1.0.attn.spatial.theta.weight`). The spatial one sits exactly where SPSA would: on the
    block's output after its last BN, before the residual addition; "spsa_first" puts it before
    the channel attention. A block with no attention has `attn = nn.Identity()`, so that its
    state_dict keys are torchvision's.
    """

    def __init__(self, channel: nn.Module | None, spsa: nn.Module | None, order: str, *,
                 spatial: nn.Module | None = None) -> None:
        super().__init__()
        if channel is None and spsa is None and spatial is None:
            raise ValueError("BlockAttention needs a channel attention, a spatial attention, or both")
        if spsa is not None and spatial is not None:
            raise ValueError("BlockAttention: the non-local / GC block is an alternative to SPSA, "
                             "not an addition: give one of spsa and spatial")
        self.order = order
        self.channel = channel
        self.spsa = spsa
        self.spatial = spatial

    def forward(self, x: Tensor) -> Tensor:
        if self.order == "channel_first":
            if self.channel is not None:
                x = self.channel(x)
            if self.spsa is not None:
                x = self.spsa(x)
            if self.spatial is not None:
                x = self.spatial(x)
        else:
            if self.spsa is not None:
                x = self.spsa(x)
            if self.spatial is not None:
                x = self.spatial(x)
            if self.channel is not None:
                x = self.channel(x)
        return x

    def extra_repr(self) -> str:
        return f"order={self.order}"


def make_spsa(channels: int, stage: StageSpec, *, inplace: bool = False) -> SPSA:
    """SPSA with the stage's heads, alpha, gate direction and similarity."""
    return SPSA(channels, alpha=stage.spsa_alpha, heads=stage.spsa_heads, inplace=inplace,
                reverse=stage.spsa_reverse, similarity=stage.spsa_similarity)


def make_spatial(channels: int, stage: StageSpec) -> nn.Module | None:
    """The non-local or GC block a stage carries instead of SPSA (None for "none").

    The non-local block is the embedded-Gaussian version with C/2 inner channels and its keys and
    values max-pooled 2x2 (Wang et al.'s defaults); the GC block has GCNet's r16 bottleneck
    (C/16 hidden channels, at least 1). Both start as the identity (zero-initialised last layer).
    """
    if stage.spatial_attn == "nonlocal":
        return NonLocalBlock(channels)
    if stage.spatial_attn == "gc":
        return GCBlock(channels)
    return None


def _make_block_attention(channels: int, *, stage: StageSpec, options: dict[str, int]) -> nn.Module:
    channel = None
    if stage.channel_attn != "none":
        channel = create_attention(stage.channel_attn, channels, **options)
    spsa = None
    if stage.spsa:  # in place: its input is always a fresh tensor (a BN's output or an attention's)
        spsa = make_spsa(channels, stage, inplace=True)
    spatial = make_spatial(channels, stage)
    if channel is None and spsa is None and spatial is None:
        return nn.Identity()
    return BlockAttention(channel, spsa, stage.attn_order, spatial=spatial)


def _no_attention(channels: int) -> nn.Module:
    del channels
    return nn.Identity()


def stage_attention(spec: ArchSpec, index: int) -> AttnFactory:
    """The attention factory for stage `index` of `spec` (called once per block with its channels).

    The spatial attention (SPSA, non-local or GC) goes into every block of the stage, as SPSA
    always has (see `make_spatial` for the non-local and GC blocks' options).

    Options: ECA's kernel is 3, 5, 5, 7 for the four ResNet/ResNeXt stages and ECA's adaptive rule
    (`eca_adaptive_kernel`) for MobileNetV2 and ShuffleNetV2; FCA's DCT size is
    max(7, the stage's feature size at `spec.input_size`); SE and CBAM keep their default ratio.
    """
    stage = spec.stages[index]
    if stage.spatial == "none" and stage.channel_attn == "none":
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


def recomputes(block: nn.Module, attn: nn.Module) -> bool:
    """Whether `block` should run its last BN and `attn` under `recompute_in_backward` now.

    Yes when the block's `memory_efficient` flag is on (the default), the block is training,
    grad is enabled, `attn` contains SPSA, and neither torch.compile (whose partitioner decides
    recomputation itself) nor TorchScript/ONNX tracing is running.
    """
    return (
        getattr(block, "memory_efficient", True)
        and block.training
        and torch.is_grad_enabled()
        and isinstance(attn, BlockAttention)
        and attn.spsa is not None
        and not torch.compiler.is_compiling()
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
    )


def _recompute_context(modules: tuple[nn.Module, ...]) -> Callable[[], AbstractContextManager[None]]:
    """A context for the recomputation: every BN in `modules` computes and saves exactly what it
    did in the forward (batch statistics of the same input), but updates throw-away copies of its
    running_mean/var/num_batches_tracked, so that the real ones are updated once per step."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    norms = [m for module in modules for m in module.modules()
             if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]

    @contextmanager
    def scratch_running_stats() -> Iterator[None]:
        kept = [{name: getattr(norm, name) for name in names} for norm in norms]
        try:
            for norm, buffers in zip(norms, kept, strict=True):
                for name, buffer in buffers.items():
                    setattr(norm, name, None if buffer is None else buffer.clone())
            yield
        finally:
            for norm, buffers in zip(norms, kept, strict=True):
                for name, buffer in buffers.items():
                    setattr(norm, name, buffer)

    return scratch_running_stats


def recompute_in_backward(fn: Callable[[Tensor], Tensor], x: Tensor, *modules: nn.Module) -> Tensor:
    """fn(x), keeping for the backward only `x` (what fn's first BN saves anyway): fn is run again
    in the backward pass (non-reentrant activation checkpointing).

    `modules` are the modules fn runs; their BNs are recomputed from the same input, so with
    batch statistics they give the forward's output exactly, and their running statistics are not
    updated a second time (the recomputation updates scratch copies). fn must be deterministic
    (no dropout): the RNG state is not preserved.
    """
    recompute = _recompute_context(modules)
    return checkpoint(fn, x, use_reentrant=False, preserve_rng_state=False,
                      context_fn=lambda: (nullcontext(), recompute()))


def set_memory_efficient(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch, in every block of `model`, the recomputation of the last BN and the attention in
    the backward pass (see `recomputes`) on or off; returns `model`."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_memory_efficient: enabled must be a bool, got {enabled!r}")
    for module in model.modules():
        if hasattr(module, "memory_efficient"):
            module.memory_efficient = enabled
    return model


def backbone_modules(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule of `module` that is not part of an attention (for the backbone's own init)."""
    yield module
    for child in module.children():
        if isinstance(child, BlockAttention):
            continue
        yield from backbone_modules(child)
