"""spsa_nas: SPSA and channel attentions, hybrid backbones, the architecture spec, one trial."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from spsa_nas.spec import ArchSpec, StageSpec

__all__ = [
    "ArchSpec",
    "StageSpec",
    "build_detector",
    "build_model",
    "count_flops",
    "count_params",
    "evaluate_spec",
    "load_weights",
]

# torch-heavy entry points load on first use, so that `spsa_nas.spec` stays importable without torch
_LAZY = {
    "build_model": "spsa_nas.models",
    "build_detector": "spsa_nas.detection",
    "load_weights": "spsa_nas.models",
    "count_params": "spsa_nas.counting",
    "count_flops": "spsa_nas.counting",
    "evaluate_spec": "spsa_nas.evaluate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spsa_nas' has no attribute {name!r}")
