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
        switches = any(len(st.choices.spsa_reverse) > 1 or len(st.choices.spsa_similarity) > 1
                       or st.choices.spatial is not None for st in space.stage_choices(backbone))
        columns = ["stage", "ch", "map", "spatial" if switches else "spsa", "heads", "alpha"]
        columns += ["reverse", "similarity"] if switches else []
        for column in (*columns, "channel_attn", "attn_order"):
            table.add_column(column)
        for i, stage in enumerate(space.stage_choices(backbone), start=1):
            c = stage.choices
            alpha = (
                c.alpha.model_dump_json(exclude_none=True)
                if not isinstance(c.alpha, list)
                else ", ".join(f"{a:g}" for a in c.alpha)
            )
            channels = "/".join(str(stage_table(backbone, w)[i - 1].channels) for w in space.widths)
            spatial = (", ".join(c.spatial_values()) if c.spatial is not None
                       else ", ".join(str(s).lower() for s in c.spsa))
            row = [f"{i} {stage.info.name}", channels, f"{stage.feature_size}x{stage.feature_size}",
                   spatial, ", ".join(map(str, c.heads)), alpha]
            if switches:  # SPSA's ablation switches (issue 13), shown where a space offers them
                row += [", ".join(str(r).lower() for r in c.spsa_reverse), ", ".join(c.spsa_similarity)]
            table.add_row(*row, ", ".join(c.channel_attn), ", ".join(c.attn_order))
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
