"""`spsa-nas spaces`: the built-in search spaces, or one space's stages and choices."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from search_spaces.loading import builtin_spaces, load_space
from search_spaces.space import SearchSpace, SpaceError
from spsa_nas.spec import stage_table
from workers.cli import UsageError


def _size(space: SearchSpace) -> str:
    size = space.size()
    return "continuous (alpha range)" if size is None else f"{size:,}"


def _show(name: str, out: Console) -> None:
    try:
        space = load_space(name)
    except SpaceError as exc:
        raise UsageError(str(exc)) from None
    out.print(f"[bold]{space.name}[/]: {space.description}")
    out.print(f"{space.summary()}; size: {_size(space)}")
    for backbone in space.backbones:
        table = Table(title=backbone)
        for column in ("stage", "ch", "map", "spsa", "heads", "alpha", "channel_attn", "attn_order"):
            table.add_column(column)
        for i, stage in enumerate(space.stage_choices(backbone), start=1):
            c = stage.choices
            alpha = (
                c.alpha.model_dump_json(exclude_none=True)
                if not isinstance(c.alpha, list)
                else ", ".join(f"{a:g}" for a in c.alpha)
            )
            channels = "/".join(str(stage_table(backbone, w)[i - 1].channels) for w in space.widths)
            table.add_row(
                f"{i} {stage.info.name}",
                channels,
                f"{stage.feature_size}x{stage.feature_size}",
                ", ".join(str(s).lower() for s in c.spsa),
                ", ".join(map(str, c.heads)),
                alpha,
                ", ".join(c.channel_attn),
                ", ".join(c.attn_order),
            )
        out.print(table)
    for note in space.notes:
        out.print(f"note: {note}")


def run_spaces(args: argparse.Namespace) -> int:
    """List the built-in spaces, or show the one named (or the YAML file given)."""
    out = Console()
    if args.name:
        _show(args.name, out)
        return 0
    table = Table(title="built-in search spaces")
    for column in ("name", "backbone / input", "architectures", "description"):
        table.add_column(column)
    for name, space in builtin_spaces().items():
        table.add_row(name, space.summary(), _size(space), space.description)
    out.print(table)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `spaces` to the `spsa-nas` command."""
    p = subparsers.add_parser("spaces", help="list the built-in search spaces, or show one")
    p.add_argument("name", nargs="?", default=None, help="a space name or YAML file to show")
    p.set_defaults(run=run_spaces)


__all__ = ["register", "run_spaces"]
