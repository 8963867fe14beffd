"""SPSA's kernels: the custom op torch.ops.spsa_nas.spsa, its fused CPU and CUDA kernels, decomposition."""

from __future__ import annotations

from spsa_nas.attention.kernels.composite import spsa_backward, spsa_decomposed
from spsa_nas.attention.kernels.op import DECOMPOSITIONS, fused_available

__all__ = ["DECOMPOSITIONS", "fused_available", "spsa_backward", "spsa_decomposed"]
