"""Attention modules: SPSA and the channel attentions, and the factory that builds them by name."""

from __future__ import annotations

from torch import nn

from spsa_nas.attention.cbam import CBAMAttention
from spsa_nas.attention.eca import ECAAttention
from spsa_nas.attention.fca import FCAAttention
from spsa_nas.attention.none import NoAttention
from spsa_nas.attention.se import SEAttention
from spsa_nas.attention.simam import SimAMAttention
from spsa_nas.attention.spsa import (
    DEFAULT_EPS,
    SIMILARITIES,
    SPSA,
    spsa_decomposed,
    spsa_fast,
    spsa_fused,
    spsa_reference,
)

__all__ = [
    "ATTENTIONS",
    "DEFAULT_EPS",
    "SIMILARITIES",
    "SPSA",
    "CBAMAttention",
    "ECAAttention",
    "FCAAttention",
    "NoAttention",
    "SEAttention",
    "SimAMAttention",
    "create_attention",
    "spsa_decomposed",
    "spsa_fast",
    "spsa_fused",
    "spsa_reference",
]

#: Channel attentions by name; the keys are exactly `spsa_nas.spec.CHANNEL_ATTENTIONS`.
ATTENTIONS: dict[str, type[nn.Module]] = {
    "none": NoAttention,
    "se": SEAttention,
    "eca": ECAAttention,
    "cbam": CBAMAttention,
    "fca": FCAAttention,
    "simam": SimAMAttention,
}


def create_attention(name: str, channels: int, **options: object) -> nn.Module:
    """Build the channel attention `name` for `channels` channels with its keyword `options`.

    Options: se: `rd_ratio`; eca: `kernel_size`; cbam: `rd_ratio`, `spatial_kernel_size`;
    fca: `dct_size`, `rd_ratio`; simam: `lambda_`; none: none.
    """
    if name not in ATTENTIONS:
        raise ValueError(f"unknown channel attention {name!r}; valid: {', '.join(ATTENTIONS)}")
    cls = ATTENTIONS[name]
    try:
        return cls(channels, **options)
    except TypeError as err:  # an option this attention does not take
        raise ValueError(f"channel attention {name!r}: bad options {sorted(options)}: {err}") from err
