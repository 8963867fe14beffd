"""The `spsa-nas` command: argument parsing, dispatch to subcommand modules, one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

from workers.cli import UsageError

# Each module defines `register(subparsers)`, adding its subcommands with `set_defaults(run=...)`;
# `run(args) -> int` returns the exit status. Modules are imported when the parser is built.
SUBCOMMAND_MODULES = (
    "workers.cli.search",  # search: the search engine, no server needed
    "workers.cli.results",  # best, export
    "workers.cli.spaces",  # spaces
    "workers.cli.maps",  # attention-map
    "workers.cli.compare",  # compare: a study's trials by choice (the ablation table)
    "service.cli.serve",  # serve: the API, plus a coordinator child process
    "service.cli.coordinator",  # coordinator: runs searches
    "service.cli.users",  # users add|token|revoke|list
    "service.cli.remote",  # remote submit|status|cancel|best|download
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spsa-nas", description="Neural-architecture search around SPSA.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in SUBCOMMAND_MODULES:
        try:
            module = import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UsageError as exc:
        print(f"spsa-nas {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spsa-nas {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
