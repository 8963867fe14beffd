"""argparse types for the benchmarks' counts, sizes and times (a bad value is a usage error naming it), and
the one way a benchmark prints its JSON result and writes it to `--out`; importing it puts the checkout
it is in first on the import path (every benchmark imports it before the project's packages)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The checkout this file belongs to. A benchmark run as `python benchmarks/x.py` has benchmarks/ on
#: its path, not the checkout: the project's packages then come from the editable install, i.e. from
#: the checkout the virtual environment was installed from. A before/after run from a worktree of an
#: older commit would so time the newer code on both sides. First on the path, this checkout's win.
CHECKOUT = Path(__file__).resolve().parent.parent
if sys.path[:1] != [str(CHECKOUT)]:
    sys.path.insert(0, str(CHECKOUT))


def count(minimum: int = 1) -> Callable[[str], int]:
    """An integer of at least `minimum` (e.g. `type=count()` for repeats, `count(0)` for warm-ups)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"count >= {minimum}"
    return parse


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive(text: str) -> float:
    """A finite number above 0 (seconds, rates, widths, learning rates)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value:g}")
    return value


def non_negative(text: str) -> float:
    """A finite number of 0 or more (a label smoothing, a warm-up time)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value:g}")
    return value


def fraction(text: str) -> float:
    """A finite number strictly between 0 and 1 (a validation share)."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value:g}")
    return value


def emit_json(result: Any, out: Path | None) -> None:
    """Print `result` as indented JSON, and also write it to `out` (its folder made) when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
