"""Make an SQLite database unwritable for a while, as root too: `chattr +i` (root ignores file modes)
on the file and its WAL, or read-only modes for other users."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


def _files(database: Path) -> list[Path]:
    return [p for p in (database, database.with_name(database.name + "-wal")) if p.exists()]


@contextlib.contextmanager
def unwritable(database: Path) -> Iterator[None]:
    """Writes to `database` (an SQLite file in WAL mode) fail inside the block; restored after."""
    files = _files(database)
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if chattr is None:
            raise RuntimeError("chattr (e2fsprogs) is needed to make a file unwritable for root")
        subprocess.run([chattr, "+i", *map(str, files)], check=True)
        try:
            yield
        finally:
            subprocess.run([chattr, "-i", *map(str, files)], check=True)
        return
    modes = {p: p.stat().st_mode for p in files}
    for p in files:
        p.chmod(0o444)
    try:
        yield
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
