"""Loading weights into a model: state_dicts and files (safetensors, torch), with a report."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: A state_dict, or a path to a `.safetensors` file or a torch file (loaded with weights_only=True).
Weights = Mapping[str, Tensor] | str | Path


@dataclass(frozen=True)
class LoadReport:
    """What `load_weights` did, key by key (keys of the model's or the given state_dict)."""

    loaded: list[str] = field(default_factory=list)  # in both, same shape: copied
    initialised: list[str] = field(default_factory=list)  # in the model only: kept as initialised
    unexpected: list[str] = field(default_factory=list)  # in the weights only: ignored
    mismatched: list[str] = field(default_factory=list)  # in both, shapes differ: kept as initialised

    def summary(self) -> str:
        """One line: how many tensors fell in each group."""
        return (f"loaded {len(self.loaded)}, initialised {len(self.initialised)}, "
                f"unexpected {len(self.unexpected)}, mismatched {len(self.mismatched)}")


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state_dict from a `.safetensors` file or a torch file (weights_only=True).

    Raises ValueError naming the path and the problem for a missing, unreadable or wrong file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"weights file {path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"weights file {path}: not a torch file loadable with weights_only=True ({first})"
        ) from exc
    return _as_state_dict(obj, f"weights file {path}")


def _as_state_dict(obj: object, where: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state_dict (a mapping of names to tensors), "
                         f"got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        hint = ""
        if any(k in obj for k in ("state_dict", "model")):
            hint = "; it looks like a training checkpoint: pass its 'state_dict' or 'model' entry"
        raise ValueError(f"{where}: expected a state_dict (names to tensors), but entries "
                         f"{bad[:5]} are not tensors{hint}")
    return dict(obj)


def load_weights(model: nn.Module, weights: Weights) -> LoadReport:
    """Copy every tensor of `weights` whose key and shape match into `model`; report the rest.

    Tensors of the model that the weights lack (typically attention modules added to a plain
    backbone) keep their initialisation; they are listed in `LoadReport.initialised` and the
    attention ones are named in a logging.info message.
    """
    if isinstance(weights, str | Path):
        state = load_state_dict_file(weights)
    else:
        state = _as_state_dict(weights, "weights")
    own = model.state_dict()
    report = LoadReport()
    with torch.no_grad():
        for key, target in own.items():
            source = state.get(key)
            if source is None:
                report.initialised.append(key)
            elif source.shape != target.shape:
                report.mismatched.append(key)
            else:
                target.copy_(source)
                report.loaded.append(key)
    report.unexpected.extend(k for k in state if k not in own)
    attn = [k for k in report.initialised if ".attn." in k]
    if attn:
        log.info("initialised %d attention tensors not in the weights: %s", len(attn), ", ".join(attn))
    if report.mismatched:
        log.warning("kept %d tensors whose shapes differ from the weights: %s",
                    len(report.mismatched), ", ".join(report.mismatched))
    return report
