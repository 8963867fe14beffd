"""What the server-side subcommands share: the settings flags and loading them as a UsageError."""

from __future__ import annotations

import argparse
from typing import Any

from workers.cli import UsageError


def settings_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="data directory (SPSA_NAS_DATA_DIR; default ./spsa-nas-data)")
    parser.add_argument("--database-url", help="SQLAlchemy URL (SPSA_NAS_DATABASE_URL)")
    parser.add_argument("--settings", help="a YAML settings file (SPSA_NAS_SETTINGS_FILE)")


def load(args: argparse.Namespace, **extra: Any) -> Any:
    from service.core.settings import SettingsError, load_settings

    try:
        return load_settings(args.settings, data_dir=args.data_dir, database_url=args.database_url, **extra)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None
